// The fused TLR window end on the CPU (csrc/tlr.h): chunks in parallel (at::parallel_for); inside
// a chunk, lane l takes elements l, l + kLanes, ... as CUDA thread l does, and the lanes are
// reduced by the tree of hd_math.h, so each chunk's partial sums are the CUDA block's. The chunk
// partials are then summed by at::sum, as on CUDA. Results do not depend on the thread count.
#include "cpu_chunks.h"
#include "fused_args.h"
#include "ops.h"
#include "tlr.h"
#include "tlr_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

namespace hyperlr {
namespace {

using cpu::kLanes;

template <typename scalar_t, typename acc_t>
void window_chunk(int64_t size, const scalar_t* __restrict__ param, scalar_t* __restrict__ snapshot,
                  scalar_t* __restrict__ prev_update, acc_t lr, bool has_previous,
                  acc_t* partial_dot, acc_t* partial_prev_sq) {
  std::array<acc_t, kLanes> dots{}, prev_sqs{};
  for (int64_t base = 0; base < size; base += kLanes) {
    const int width = static_cast<int>(std::min<int64_t>(kLanes, size - base));
    for (int lane = 0; lane < width; ++lane) {
      const int64_t i = base + lane;
      const acc_t w = static_cast<acc_t>(param[i]);
      const acc_t update = math::tlr_update(static_cast<acc_t>(snapshot[i]), w, lr);
      math::TlrSums<acc_t> sums{dots[lane], prev_sqs[lane]};
      math::tlr_sums_step(sums, static_cast<acc_t>(prev_update[i]), update, has_previous);
      dots[lane] = sums.dot;
      prev_sqs[lane] = sums.prev_sq;
      snapshot[i] = param[i];
      prev_update[i] = static_cast<scalar_t>(update);
    }
  }
  *partial_dot = cpu::tree_reduce(dots);
  *partial_prev_sq = cpu::tree_reduce(prev_sqs);
}

at::Tensor tlr_window_cpu(at::TensorList params, at::TensorList snapshots,
                          at::TensorList prev_updates, const at::Tensor& lr, bool has_previous) {
  check_tlr_args(params, snapshots, prev_updates, lr);
  if (params.empty()) {
    return at::zeros({2}, lr.options());
  }
  const std::vector<at::Tensor> p = contiguous_list(params);
  const std::vector<at::Tensor> s = contiguous_list(snapshots);
  const std::vector<at::Tensor> u = contiguous_list(prev_updates);
  const cpu::ChunkList chunks = cpu::make_chunks(p);
  const int64_t n = static_cast<int64_t>(chunks.chunks.size());
  at::Tensor partials = at::zeros({2, n}, lr.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(), "tlr_window_cpu",
                                  [&] {
    using acc_t = math::acc_type<scalar_t>;
    const acc_t eta = *lr.const_data_ptr<acc_t>();
    acc_t* out = partials.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const cpu::ChunkRef& chunk = chunks.chunks[c];
        window_chunk<scalar_t, acc_t>(
            chunk.size, p[chunk.tensor].const_data_ptr<scalar_t>() + chunk.offset,
            s[chunk.tensor].mutable_data_ptr<scalar_t>() + chunk.offset,
            u[chunk.tensor].mutable_data_ptr<scalar_t>() + chunk.offset, eta, has_previous,
            out + c, out + n + c);
      }
    });
  });
  copy_back_list(snapshots, s);
  copy_back_list(prev_updates, u);
  return partials.sum(1);
}

}  // namespace
}  // namespace hyperlr

TORCH_LIBRARY_IMPL(hyperlr_ext, CPU, m) {
  m.impl("tlr_window_", &hyperlr::tlr_window_cpu);
}
