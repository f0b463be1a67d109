// Layer 1 of the kernels (docs/design.md, Conventions): arithmetic on registers, no memory access,
// no indexing. Every function here is compiled both for the host (the CPU kernels) and for the
// device (the CUDA functors), so the CPU tests run the same arithmetic, in the same order, as the
// GPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HYPERLR_HOST_DEVICE __host__ __device__
#else
#define HYPERLR_HOST_DEVICE
#endif
// Forced inline on the host: a call left in a CPU kernel's element loop stops its vectorisation.
#if defined(__CUDACC__) || !(defined(__GNUC__) || defined(__clang__))
#define HYPERLR_INLINE HYPERLR_HOST_DEVICE inline
#else
#define HYPERLR_INLINE inline __attribute__((always_inline))
#endif

namespace hyperlr {
namespace math {

// ---- Reduction layout --------------------------------------------------------------------------
// A reduction over tensor lists is cut into chunks of kChunkSize elements (one CUDA block each;
// zero-size tensors give no chunk). Inside a chunk, lane l (= CUDA thread l) sums the elements
// i with i % kLanes == l in increasing order; the kLanes lane sums are then combined by a fixed
// binary tree (tree_level). The chunk results, in chunk order, are reduced the same way (lane
// sums, then the tree). The CPU kernels emulate the lanes, so CPU and GPU agree bit for bit and
// no result depends on the thread count or on scheduling.
constexpr int64_t kChunkSize = 65536;
constexpr int kLanes = 512;
static_assert((kLanes & (kLanes - 1)) == 0, "kLanes must be a power of two");

// Accumulation type: float for float/half/bfloat16 inputs, double for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// ---- Correctly rounded primitives --------------------------------------------------------------
// Separate multiply and add, each rounded to nearest. On the device the _rn intrinsics stop nvcc
// from contracting them into an FMA; the host files are compiled with -ffp-contract=off.
HYPERLR_INLINE float add_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(x, y);
#else
  return x + y;
#endif
}
HYPERLR_INLINE double add_rn(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(x, y);
#else
  return x + y;
#endif
}
HYPERLR_INLINE float mul_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}
HYPERLR_INLINE double mul_rn(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(x, y);
#else
  return x * y;
#endif
}

// ---- Dot products ------------------------------------------------------------------------------
// One term of <a, b> added to a lane's running sum: acc + a*b.
template <typename acc_t>
HYPERLR_INLINE acc_t dot_step(acc_t acc, acc_t a, acc_t b) {
  return add_rn(acc, mul_rn(a, b));
}

// One value added to a lane's running sum (the reduction of chunk results).
template <typename acc_t>
HYPERLR_INLINE acc_t sum_step(acc_t acc, acc_t value) {
  return add_rn(acc, value);
}

// One node of the tree over lane sums: at level `stride` (kLanes/2, kLanes/4, ..., 1), every
// lane < stride adds the lane `stride` above it. After the level stride == 1, lanes[0] holds the
// total.
template <typename acc_t>
HYPERLR_INLINE void tree_level(acc_t* lanes, int lane, int stride) {
  lanes[lane] = add_rn(lanes[lane], lanes[lane + stride]);
}

}  // namespace math
}  // namespace hyperlr
