// Layer 1 of the fused TLR window end (docs/design.md, Conventions): one element of the window's
// update u = (w_snapshot - w) / eta, of the two sums <u_prev, u> and |u_prev|^2, on registers.
// Shared by the CPU kernel (csrc/tlr_cpu.cpp) and the CUDA functor (csrc/cuda/tlr.cu).
// Equations: docs/design.md, TLR; reference: hyperlr_ext/functional/tlr.py.
#pragma once

#include "hd_math.h"

namespace hyperlr {
namespace math {

template <typename acc_t>
struct TlrSums {
  acc_t dot;      // <u_prev, u>
  acc_t prev_sq;  // |u_prev|^2
};

// u of one element: (w_snapshot - w) / eta, the window's mean update direction.
template <typename acc_t>
HYPERLR_INLINE acc_t tlr_update(acc_t snapshot, acc_t param, acc_t lr) {
  return div_rn(add_rn(snapshot, -param), lr);
}

// Adds one element to a lane's sums (u_prev counts only when the previous window exists).
template <typename acc_t>
HYPERLR_INLINE void tlr_sums_step(TlrSums<acc_t>& sums, acc_t prev_update, acc_t update,
                                  bool has_previous) {
  const acc_t dot = dot_step(sums.dot, prev_update, update);
  const acc_t prev_sq = dot_step(sums.prev_sq, prev_update, prev_update);
  sums.dot = has_previous ? dot : sums.dot;
  sums.prev_sq = has_previous ? prev_sq : sums.prev_sq;
}

}  // namespace math
}  // namespace hyperlr
