// The CUDA runtime as our kernels use it: the current stream, a device guard, memset, the one
// kernel launch and its check, and the registration of the CUDA kernels.
//
// Under nvcc these are the CUDA runtime and ATen's CUDA helpers. In the emulation build
// (HYPERLR_CUDA_EMU, tests/cuda_emu/cuda_emu.h included in front of the .cu file and compiled as
// C++), the same names run the kernels on the CPU and register them with the test-only library
// hyperlr_ext_emu, for CPU tensors; docs/cuda_testing.md explains it.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstddef>

#if defined(HYPERLR_CUDA_EMU)
#define HYPERLR_LAUNCH_KERNEL(kernel, grid, block, stream, ...) \
  CUDA_EMU_LAUNCH(kernel, grid, block, 0, stream, __VA_ARGS__)
#define HYPERLR_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(hyperlr_ext_emu, CPU, m)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define HYPERLR_LAUNCH_KERNEL(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define HYPERLR_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(hyperlr_ext, CUDA, m)
#endif

namespace hyperlr {
namespace cuda {

#if defined(HYPERLR_CUDA_EMU)
inline cudaStream_t current_stream() {
  return nullptr;
}
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
#else
inline cudaStream_t current_stream() {
  return at::cuda::getCurrentCUDAStream();
}
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

inline void check_cuda(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "hyperlr_ext: ", what, " failed: ",
              cudaGetErrorString(error));
}

// Sets `bytes` bytes at `address` (device memory) to `value`, in stream order.
inline void memset_async(void* address, int value, size_t bytes) {
  check_cuda(cudaMemsetAsync(address, value, bytes, current_stream()), "cudaMemsetAsync");
}

// After a launch: a configuration the device refused is an error here, not later.
inline void check_launch() {
  check_cuda(cudaGetLastError(), "kernel launch");
}

}  // namespace cuda
}  // namespace hyperlr
