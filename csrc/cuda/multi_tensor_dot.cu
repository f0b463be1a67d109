// multi_tensor_dot on CUDA: sum_i <a[i], b[i]> in one pass over the lists, no host sync.
// Each block reduces one chunk into a per-block partial; the last block to finish reduces the
// partials in block order and writes the 0-dim result. No float atomics: the result is
// deterministic and equal, bit for bit, to the CPU kernel's (same math, csrc/hd_math.h).
#include "cuda/block_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "hd_math.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

namespace hyperlr {
namespace cuda {
namespace {

constexpr int kUnroll = 4;  // loads in flight per thread

// lists: 0 a, 1 b (same dtype and numel, contiguous)
template <typename scalar_t, typename acc_t>
struct DotChunkFunctor {
  // block_partials: one acc_t per block (global block number); blocks_done: zeroed counter;
  // result: the 0-dim output.
  __device__ void operator()(const Chunk<2>& chunk, acc_t* block_partials,
                             unsigned int* blocks_done, int64_t total_blocks,
                             acc_t* result) const {
    const scalar_t* a = chunk.template data<const scalar_t>(0);
    const scalar_t* b = chunk.template data<const scalar_t>(1);
    const int lane = static_cast<int>(threadIdx.x);

    // Lane `lane` sums elements lane, lane + kLanes, ... in increasing order.
    acc_t lane_sum = 0;
    for (int64_t base = lane; base < chunk.size; base += kUnroll * kBlockThreads) {
      acc_t a_vals[kUnroll];
      acc_t b_vals[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t i = base + static_cast<int64_t>(k) * kBlockThreads;
        if (i < chunk.size) {
          a_vals[k] = static_cast<acc_t>(a[i]);
          b_vals[k] = static_cast<acc_t>(b[i]);
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        if (base + static_cast<int64_t>(k) * kBlockThreads < chunk.size) {
          lane_sum = math::dot_step(lane_sum, a_vals[k], b_vals[k]);
        }
      }
    }
    const acc_t block_sum = block_tree_reduce(lane_sum);

    __shared__ bool is_last_block;
    if (lane == 0) {
      block_partials[chunk.block] = block_sum;
      __threadfence();  // the partial is visible before the counter says so
      const unsigned int finished_before = atomicAdd(blocks_done, 1u);
      is_last_block = (static_cast<int64_t>(finished_before) == total_blocks - 1);
    }
    __syncthreads();
    if (!is_last_block) {
      return;
    }
    __threadfence();

    // Every partial is written: reduce them in block order (hd_math.h's layout).
    acc_t lane_total = 0;
    for (int64_t i = lane; i < total_blocks; i += kBlockThreads) {
      lane_total = math::sum_step(lane_total, __ldcg(block_partials + i));
    }
    const acc_t total = block_tree_reduce(lane_total);
    if (lane == 0) {
      *result = total;
      *blocks_done = 0;
    }
  }
};

at::Tensor multi_tensor_dot_cuda(at::TensorList a, at::TensorList b) {
  check_multi_tensor_dot_args(a, b);
  if (a.empty()) {
    return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  }
  const DeviceGuard device_guard(a[0].device());
  const std::vector<at::Tensor> a_contig = contiguous_list(a);
  const std::vector<at::Tensor> b_contig = contiguous_list(b);
  const auto out_options = a[0].options().dtype(dot_result_dtype(a[0].scalar_type()));

  const int64_t total_blocks = count_chunks(a_contig);
  if (total_blocks == 0) {
    return at::zeros({}, out_options);
  }
  TORCH_CHECK(total_blocks < std::numeric_limits<int32_t>::max(),
              "multi_tensor_dot: too many elements (", total_blocks, " chunks of ", kChunkSize,
              ")");
  at::Tensor result = at::empty({}, out_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a[0].scalar_type(), "multi_tensor_dot_cuda", [&] {
        using acc_t = math::acc_type<scalar_t>;
        // Scratch: total_blocks partials, then the finished-blocks counter.
        const int64_t scratch_bytes =
            total_blocks * static_cast<int64_t>(sizeof(acc_t)) + sizeof(unsigned int);
        at::Tensor scratch = at::empty({scratch_bytes}, a[0].options().dtype(at::kByte));
        auto* block_partials = reinterpret_cast<acc_t*>(scratch.mutable_data_ptr());
        auto* blocks_done = reinterpret_cast<unsigned int*>(block_partials + total_blocks);
        memset_async(blocks_done, 0, sizeof(unsigned int));
        multi_tensor_apply<2>({at::TensorList(a_contig), at::TensorList(b_contig)},
                              DotChunkFunctor<scalar_t, acc_t>{}, block_partials, blocks_done,
                              total_blocks, result.mutable_data_ptr<acc_t>());
      });
  return result;
}

}  // namespace
}  // namespace cuda
}  // namespace hyperlr

HYPERLR_CUDA_LIBRARY_IMPL(m) {
  m.impl("multi_tensor_dot", &hyperlr::cuda::multi_tensor_dot_cuda);
}
