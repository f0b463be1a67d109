// The fused HyperLR pass on the CPU (csrc/hyper_lr.h; math in csrc/hyper_lr_math.h). Chunks of
// kChunkSize elements run in parallel (at::parallel_for); inside a chunk the elements are visited
// in runs of kLanes, lane l taking element l of every run, exactly as CUDA thread l of a block
// does; each chunk's lanes are reduced by the tree of hd_math.h and the chunk sums per LR slot in
// chunk order (csrc/cpu_hd_reduce.h), as the last CUDA block does. Results do not depend on the
// thread count.
#include "cpu_chunks.h"
#include "cpu_hd_reduce.h"
#include "fused_args.h"
#include "hyper_lr.h"
#include "hyper_lr_math.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace hyperlr {
namespace {

using cpu::kLanes;
using cpu::LaneSums;

// One tensor's data for one chunk.
template <typename scalar_t>
struct ChunkData {
  const scalar_t* param;
  const scalar_t* grad;
  scalar_t* snapshot;
  bool has_previous;
};

// One chunk: its elements' sums into `lanes`, and snapshot <- param unless `keeps_snapshot`.
template <typename scalar_t, typename acc_t>
void sums_chunk(const ChunkData<scalar_t>& c, int64_t size, bool keeps_snapshot,
                const math::HyperLrSettings<acc_t>& s, LaneSums<acc_t>& lanes) {
  acc_t* __restrict__ dot = lanes.dot.data();
  acc_t* __restrict__ grad_sq = lanes.grad_sq.data();
  acc_t* __restrict__ dir_sq = lanes.dir_sq.data();
  for (int64_t base = 0; base < size; base += kLanes) {
    const int width = static_cast<int>(std::min<int64_t>(kLanes, size - base));
    const scalar_t* __restrict__ param = c.param + base;
    const scalar_t* __restrict__ grad = c.grad + base;
    scalar_t* __restrict__ snapshot = c.snapshot + base;
    for (int lane = 0; lane < width; ++lane) {
      const scalar_t w = param[lane];
      const scalar_t old = snapshot[lane];
      math::HdSums<acc_t> sums{dot[lane], grad_sq[lane], dir_sq[lane]};
      math::hyper_lr_sums_step(sums, static_cast<acc_t>(grad[lane]), static_cast<acc_t>(w),
                               static_cast<acc_t>(old), c.has_previous, s);
      dot[lane] = sums.dot;
      grad_sq[lane] = sums.grad_sq;
      dir_sq[lane] = sums.dir_sq;
      snapshot[lane] = keeps_snapshot ? old : w;
    }
  }
}

template <typename scalar_t>
void run_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
             const std::vector<at::Tensor>& snapshots, at::IntArrayRef has_previous,
             double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, const at::Tensor& out) {
  using acc_t = math::acc_type<scalar_t>;
  const math::HyperLrSettings<acc_t> s{
      static_cast<acc_t>(math::inverse_grad_scale(float_ptr_or_null(grad_scale))),
      static_cast<acc_t>(weight_decay), maximize};
  const bool skips_step = math::skips_step(float_ptr_or_null(found_inf));
  const cpu::ChunkList list = cpu::make_chunks(params);
  const auto chunk_pass = [&](const cpu::ChunkRef& chunk, LaneSums<acc_t>& lanes) {
    const ChunkData<scalar_t> c{cpu::chunk_const_ptr<scalar_t>(params, chunk),
                                cpu::chunk_const_ptr<scalar_t>(grads, chunk),
                                cpu::chunk_ptr<scalar_t>(snapshots, chunk),
                                has_previous[chunk.tensor] != 0};
    sums_chunk(c, chunk.size, math::hyper_lr_keeps_snapshot(skips_step, c.has_previous), s,
               lanes);
  };
  const int64_t num_slots = out.size(1);
  acc_t* sums = out.mutable_data_ptr<acc_t>();
  cpu::reduce_slots(list, cpu::chunk_sums<acc_t>(list, chunk_pass), num_slots,
                    [&](int64_t slot, const math::HdSums<acc_t>& total) {
                      sums[slot] = total.dot;
                      sums[num_slots + slot] = total.grad_sq;
                      sums[2 * num_slots + slot] = total.dir_sq;
                    });
}

at::Tensor hyper_lr_sums_cpu(at::TensorList params, at::TensorList grads,
                             at::TensorList snapshots, at::IntArrayRef has_previous,
                             int64_t num_slots, double weight_decay, bool maximize,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  check_hyper_lr_args(params, grads, snapshots, has_previous, num_slots, grad_scale, found_inf);
  if (params.empty()) {
    return hyper_lr_empty_result(num_slots);
  }
  const std::vector<at::Tensor> p = contiguous_list(params);
  const std::vector<at::Tensor> g = contiguous_list(grads);
  const std::vector<at::Tensor> s = contiguous_list(snapshots);
  const at::ScalarType acc = dot_result_dtype(params[0].scalar_type());
  at::Tensor sums = at::empty({3, num_slots}, params[0].options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(),
                                  "hyper_lr_sums_cpu", [&] {
    run_cpu<scalar_t>(p, g, s, has_previous, weight_decay, maximize, grad_scale, found_inf, sums);
  });
  copy_back_list(snapshots, s);
  return sums;
}

// Without a tensor of ours to dispatch on (empty lists) the call lands here: the empty result.
// A device without a kernel gets an error naming it.
at::Tensor hyper_lr_sums_composite(at::TensorList params, at::TensorList grads,
                                   at::TensorList snapshots, at::IntArrayRef has_previous,
                                   int64_t num_slots, double weight_decay, bool maximize,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf) {
  check_hyper_lr_args(params, grads, snapshots, has_previous, num_slots, grad_scale, found_inf);
  TORCH_CHECK(params.empty(), "hyper_lr_sums_: no kernel for params on ", params[0].device());
  return hyper_lr_empty_result(num_slots);
}

}  // namespace
}  // namespace hyperlr

TORCH_LIBRARY_IMPL(hyperlr_ext, CPU, m) {
  m.impl("hyper_lr_sums_", &hyperlr::hyper_lr_sums_cpu);
}

TORCH_LIBRARY_IMPL(hyperlr_ext, CompositeExplicitAutograd, m) {
  m.impl("hyper_lr_sums_", &hyperlr::hyper_lr_sums_composite);
}
