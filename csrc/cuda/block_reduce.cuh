// The tree over a block's lane values (csrc/hd_math.h, tree_level), shared by the reductions.
#pragma once

#include "cuda/multi_tensor_apply.cuh"
#include "hd_math.h"

namespace hyperlr {
namespace cuda {

// Thread 0 gets the tree over the block's lane values (csrc/hd_math.h, tree_level); every other
// thread gets 0. The levels below a warp's width run in warp 0 after the last block-wide barrier,
// so no thread outside warp 0 may read lanes[0]: it could still be being written.
template <typename acc_t>
__device__ acc_t block_tree_reduce(acc_t lane_value) {
  __shared__ acc_t lanes[kBlockThreads];
  __syncthreads();  // a previous call's readers are done with `lanes`
  lanes[threadIdx.x] = lane_value;
  __syncthreads();
  for (int stride = kBlockThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) {
      math::tree_level(lanes, static_cast<int>(threadIdx.x), stride);
    }
    // Levels below a warp's width run inside warp 0.
    if (stride > 32) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  }
  return threadIdx.x == 0 ? lanes[0] : acc_t(0);
}

}  // namespace cuda
}  // namespace hyperlr
