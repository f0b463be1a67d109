// Layer 1 of the fused HyperLR pass (docs/design.md, Conventions): one element of the objective
// gradient g^, of the previous update snapshot - w, and of their three sums, on registers. Shared
// by the CPU kernel (csrc/hyper_lr_cpu.cpp) and the CUDA functor (csrc/cuda/hyper_lr.cu); the
// reference is hyperlr_ext/functional/hyper_lr.py (hyper_lr_sums_).
#pragma once

#include "hd_math.h"

namespace hyperlr {
namespace math {

// The settings of one pass, in the accumulation type.
template <typename acc_t>
struct HyperLrSettings {
  acc_t inv_grad_scale;  // 1 / AMP's grad scale (1 without a scaler)
  acc_t weight_decay;    // the wrapped optimizer's L2 term, 0 for none
  bool maximize;
};

// g^ = +-(g / S) + weight_decay * w: the gradient of the objective whose LR is learned.
template <typename acc_t>
HYPERLR_INLINE acc_t hyper_lr_objective(acc_t grad, acc_t param, const HyperLrSettings<acc_t>& s) {
  const acc_t unscaled = unscale(grad, s.inv_grad_scale);
  // Both sides are computed and one is selected (no branch: the CPU loops vectorise).
  const acc_t signed_grad = s.maximize ? -unscaled : unscaled;
  const acc_t with_decay = add_rn(signed_grad, mul_rn(s.weight_decay, param));
  return s.weight_decay != acc_t(0) ? with_decay : signed_grad;
}

// The previous update of one element: snapshot - w.
template <typename acc_t>
HYPERLR_INLINE acc_t hyper_lr_update(acc_t snapshot, acc_t param) {
  return add_rn(snapshot, -param);
}

// Whether the snapshot keeps its value: on a step AMP skips (found_inf set), for a tensor that
// has a snapshot from the previous step. A tensor without one takes w even then: the weights did
// not move, so at the next step its update is 0, as it is without a snapshot.
HYPERLR_INLINE bool hyper_lr_keeps_snapshot(bool skips_step, bool has_previous) {
  return skips_step && has_previous;
}

// Adds one element to a lane's sums <g^, snapshot - w>, |g^|^2, |snapshot - w|^2; the update
// counts only when the tensor has a snapshot from the previous step.
template <typename acc_t>
HYPERLR_INLINE void hyper_lr_sums_step(HdSums<acc_t>& sums, acc_t grad, acc_t param,
                                       acc_t snapshot, bool has_previous,
                                       const HyperLrSettings<acc_t>& s) {
  hd_sums_step(sums, hyper_lr_objective(grad, param, s), hyper_lr_update(snapshot, param),
               has_previous);
}

}  // namespace math
}  // namespace hyperlr
