// The run-time choice of the CPU kernels' AVX2 variants (csrc/cpu_hd_reduce.h).
#include "cpu_hd_reduce.h"

#include <atomic>

namespace hyperlr {
namespace cpu {
namespace {

std::atomic<bool> avx2_allowed{true};

bool cpu_has_avx2() {
#if HYPERLR_HAVE_AVX2_VARIANTS
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

}  // namespace

bool use_avx2() { return cpu_has_avx2() && avx2_allowed.load(std::memory_order_relaxed); }

bool set_avx2_allowed(bool allowed) { return avx2_allowed.exchange(allowed) && cpu_has_avx2(); }

}  // namespace cpu
}  // namespace hyperlr
