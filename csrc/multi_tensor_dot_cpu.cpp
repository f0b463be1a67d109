// multi_tensor_dot on the CPU: the CUDA kernel's reduction (csrc/hd_math.h) with the lanes of a
// block emulated by an array, chunks in parallel, chunk results reduced in chunk order.
#include "cpu_chunks.h"
#include "hd_math.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

namespace hyperlr {
namespace {

using math::kLanes;

using cpu::ChunkRef;
using cpu::reduce_range;
using cpu::tree_reduce;

// <a, b> over one chunk of n <= kChunkSize elements, as one CUDA block computes it.
template <typename scalar_t, typename acc_t>
acc_t chunk_dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  std::array<acc_t, kLanes> lanes{};
  for (int64_t base = 0; base < n; base += kLanes) {
    const int width = static_cast<int>(std::min<int64_t>(kLanes, n - base));
    for (int lane = 0; lane < width; ++lane) {
      lanes[lane] = math::dot_step(lanes[lane], static_cast<acc_t>(a[base + lane]),
                                   static_cast<acc_t>(b[base + lane]));
    }
  }
  return tree_reduce(lanes);
}

at::Tensor multi_tensor_dot_cpu(at::TensorList a, at::TensorList b) {
  check_multi_tensor_dot_args(a, b);
  if (a.empty()) {
    return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  }
  const std::vector<at::Tensor> a_contig = contiguous_list(a);
  const std::vector<at::Tensor> b_contig = contiguous_list(b);
  const auto out_options = a[0].options().dtype(dot_result_dtype(a[0].scalar_type()));

  // The chunks in the order the CUDA launcher numbers its blocks.
  const std::vector<ChunkRef> chunks = cpu::make_chunks(a_contig).chunks;
  at::Tensor result = at::empty({}, out_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a[0].scalar_type(), "multi_tensor_dot_cpu", [&] {
        using acc_t = math::acc_type<scalar_t>;
        std::vector<acc_t> chunk_results(chunks.size());
        at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            const ChunkRef& chunk = chunks[c];
            const scalar_t* a_data = a_contig[chunk.tensor].const_data_ptr<scalar_t>();
            const scalar_t* b_data = b_contig[chunk.tensor].const_data_ptr<scalar_t>();
            chunk_results[c] =
                chunk_dot<scalar_t, acc_t>(a_data + chunk.offset, b_data + chunk.offset, chunk.size);
          }
        });
        // The sum of the chunk results, as the last CUDA block computes it.
        *result.mutable_data_ptr<acc_t>() =
            reduce_range(chunk_results, 0, static_cast<int64_t>(chunk_results.size()));
      });
  return result;
}

}  // namespace
}  // namespace hyperlr

TORCH_LIBRARY_IMPL(hyperlr_ext, CPU, m) {
  m.impl("multi_tensor_dot", &hyperlr::multi_tensor_dot_cpu);
}
