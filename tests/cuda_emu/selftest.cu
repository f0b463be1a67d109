// Kernels that test the emulation itself (tests/test_cuda_emu.py, tests/cuda_emu/driver.cpp):
// warp collectives, atomics, poisoned shared memory, the block reduction of csrc/cuda, and
// kernels with deliberate bugs that the emulation must report. Registered as
// torch.ops.hyperlr_ext_emu.selftest(name, out, blocks, threads); built only into the emulation
// targets. The "LINE:" comments mark lines whose numbers the tests look up.
#include "cuda/block_reduce.cuh"
#include "cuda/runtime.cuh"
#include "ops.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace hyperlr {
namespace cuda {
namespace selftest {

// out[block]: the tree sum of 1 .. blockDim.x (block_tree_reduce, as the kernels use it).
__global__ void block_sum_kernel(float* out) {
  const float total = block_tree_reduce(static_cast<float>(threadIdx.x + 1));
  if (threadIdx.x == 0) {
    out[blockIdx.x] = total;
  }
}

// block_tree_reduce as it was before the fix: every thread reads lanes[0], which warp 0 may
// still be writing. out[thread] = what each thread read.
__global__ void racy_block_sum_kernel(float* out) {
  __shared__ float lanes[kBlockThreads];
  __syncthreads();
  lanes[threadIdx.x] = static_cast<float>(threadIdx.x + 1);
  __syncthreads();
  for (int stride = kBlockThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) {
      math::tree_level(lanes, static_cast<int>(threadIdx.x), stride);
    }
    if (stride > 32) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = lanes[0];
}

constexpr int kWarpResults = 9;

// out[thread * kWarpResults + k]: warp shuffles and votes of each thread (int32).
__global__ void warp_ops_kernel(int32_t* out) {
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % 32;
  int32_t* mine = out + (blockIdx.x * blockDim.x + t) * kWarpResults;
  int down = t;
  for (int offset = 16; offset > 0; offset /= 2) {
    down += __shfl_down_sync(0xffffffffu, down, offset);
  }
  int butterfly = t;
  for (int offset = 1; offset < 32; offset *= 2) {
    butterfly += __shfl_xor_sync(0xffffffffu, butterfly, offset);
  }
  int prefix = t;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int from_below = __shfl_up_sync(0xffffffffu, prefix, offset);
    if (lane >= offset) {
      prefix += from_below;
    }
  }
  const double broadcast = __shfl_sync(0xffffffffu, 10.5 * t, 3);
  const unsigned int ballot = __ballot_sync(0xffffffffu, lane % 3 == 0);
  const bool any = __any_sync(0xffffffffu, t == 40);
  const bool all = __all_sync(0xffffffffu, lane != 31);
  // Half-warp segments (width 16) and a mask of the low half only.
  const int segment_down = __shfl_down_sync(0xffffffffu, t, 8, 16);
  int low_half = -1;
  if (lane < 16) {
    low_half = __shfl_xor_sync(0x0000ffffu, t, 1);
  }
  mine[0] = down;
  mine[1] = butterfly;
  mine[2] = prefix;
  mine[3] = static_cast<int32_t>(broadcast * 2);
  mine[4] = static_cast<int32_t>(ballot);
  mine[5] = any;
  mine[6] = all;
  mine[7] = segment_down;
  mine[8] = low_half;
}

// out[0..3]: atomicAdd count (uint32), atomicAdd of 0.5 (float bits), atomicMax of the thread
// index, atomicCAS winners; summed over every thread of every block.
__global__ void atomics_kernel(uint32_t* out) {
  atomicAdd(out, 1u);
  atomicAdd(reinterpret_cast<float*>(out + 1), 0.5f);
  atomicMax(out + 2, static_cast<uint32_t>(blockIdx.x * blockDim.x + threadIdx.x));
  if (atomicCAS(out + 3, 0u, 1u) == 0u) {
    atomicAdd(out + 4, 1u);  // exactly one thread wins the CAS
  }
}

template <typename T>
__device__ T unwritten_template_shared() {
  __shared__ T cells[4];
  return cells[threadIdx.x % 4];
}

// out[block * 8 + k]: the bits of shared memory read before any write, in a template (k < 4)
// and a plain kernel (k >= 4); the block then writes it, so the next block would see that
// without the poisoning.
__global__ void poison_kernel(uint32_t* out) {
  __shared__ uint32_t plain[4];
  const float from_template = unwritten_template_shared<float>();
  __syncthreads();
  if (threadIdx.x < 4) {
    uint32_t bits;
    std::memcpy(&bits, &from_template, sizeof(bits));
    out[blockIdx.x * 8 + threadIdx.x] = bits;
    out[blockIdx.x * 8 + 4 + threadIdx.x] = plain[threadIdx.x];
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    plain[threadIdx.x] = 7u;
  }
  __syncthreads();
}

// Deliberate bugs: each must abort with the lines involved.
__global__ void divergent_syncthreads_kernel() {
  if (threadIdx.x < 32) {
    __syncthreads();  // LINE: divergent_syncthreads_a
  } else {
    __syncthreads();  // LINE: divergent_syncthreads_b
  }
}

__global__ void divergent_syncwarp_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncwarp();  // LINE: divergent_syncwarp_a
  } else {
    __syncwarp();  // LINE: divergent_syncwarp_b
  }
}

__global__ void early_return_kernel() {
  if (threadIdx.x == 7) {
    return;
  }
  __syncthreads();  // LINE: early_return
}

__global__ void shuffle_outside_mask_kernel() {
  if (threadIdx.x % 32 < 16) {
    __shfl_sync(0x0000ffffu, 1, 20);  // LINE: shuffle_outside_mask
  }
}

__global__ void empty_kernel() {}

void run(const std::string& name, const at::Tensor& out, int64_t blocks, int64_t threads) {
  TORCH_CHECK(out.is_contiguous() && out.device().is_cpu(), "selftest: out must be contiguous");
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(static_cast<unsigned>(threads));
  const cudaStream_t stream = current_stream();
  void* data = out.data_ptr();
  if (name == "block_sum") {
    HYPERLR_LAUNCH_KERNEL(block_sum_kernel, grid, block, stream, static_cast<float*>(data));
  } else if (name == "racy_block_sum") {
    HYPERLR_LAUNCH_KERNEL(racy_block_sum_kernel, grid, block, stream, static_cast<float*>(data));
  } else if (name == "warp_ops") {
    HYPERLR_LAUNCH_KERNEL(warp_ops_kernel, grid, block, stream, static_cast<int32_t*>(data));
  } else if (name == "atomics") {
    HYPERLR_LAUNCH_KERNEL(atomics_kernel, grid, block, stream, static_cast<uint32_t*>(data));
  } else if (name == "poison") {
    HYPERLR_LAUNCH_KERNEL(poison_kernel, grid, block, stream, static_cast<uint32_t*>(data));
  } else if (name == "divergent_syncthreads") {
    HYPERLR_LAUNCH_KERNEL(divergent_syncthreads_kernel, grid, block, stream);
  } else if (name == "divergent_syncwarp") {
    HYPERLR_LAUNCH_KERNEL(divergent_syncwarp_kernel, grid, block, stream);
  } else if (name == "early_return") {
    HYPERLR_LAUNCH_KERNEL(early_return_kernel, grid, block, stream);
  } else if (name == "shuffle_outside_mask") {
    HYPERLR_LAUNCH_KERNEL(shuffle_outside_mask_kernel, grid, block, stream);
  } else if (name == "empty") {
    HYPERLR_LAUNCH_KERNEL(empty_kernel, grid, block, stream);
  } else {
    TORCH_CHECK(false, "selftest: unknown kernel '", name, "'");
  }
  check_launch();
}

}  // namespace selftest
}  // namespace cuda
}  // namespace hyperlr

// The test-only library: every schema of hyperlr_ext (their emulated CUDA kernels register in
// csrc/cuda/*.cu through HYPERLR_CUDA_LIBRARY_IMPL), and the selftest kernels.
TORCH_LIBRARY(hyperlr_ext_emu, m) {
  hyperlr::define_ops(m);
  m.def("selftest(str name, Tensor(a!) out, int blocks, int threads) -> ()");
}

TORCH_LIBRARY_IMPL(hyperlr_ext_emu, CPU, m) {
  m.impl("selftest", &hyperlr::cuda::selftest::run);
}
