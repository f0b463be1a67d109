// Layer 1 of the fused Adam-HD kernels (docs/design.md, Conventions): one element of
// torch.optim.Adam's / AdamW's step, of the recomputed previous direction d_{t-1}, on registers.
// Shared by the CPU kernel (csrc/adam_hd_cpu.cpp) and the CUDA functors (csrc/cuda/adam_hd.cu).
// The reference is hyperlr_ext/functional/adam_hd.py (_adam_hd_impl); the HD rule and sums are
// sgd_hd_math.h's.
#pragma once

#include "hd_math.h"

#include <cmath>

namespace hyperlr {
namespace math {

template <typename acc_t>
struct AdamSettings {
  acc_t beta1;
  acc_t beta2;
  acc_t one_minus_beta1;  // formed in double on the host, as torch.optim passes 1 - beta
  acc_t one_minus_beta2;
  acc_t eps;
  // lambda where it applies, else 0: the decay terms are then exactly +0 (finite w) and the
  // element loops need no select around them (a select guarding a division stops GCC's
  // vectorisation).
  acc_t l2_decay;     // Adam: lambda w added to the gradient
  acc_t adamw_decay;  // AdamW: lambda w added to the direction
  bool small_lerp_weight;  // |1 - beta1| < 0.5: torch's lerp takes its first form
  acc_t sign;              // -1 with maximize, else 1 (a multiply, exact, instead of a select)
  bool amsgrad;
  bool maximize;
};

// The settings from torch.optim.Adam's arguments, built on the host (1 - beta formed in double,
// as torch.optim passes it); every op with an Adam step builds them here.
template <typename acc_t>
inline AdamSettings<acc_t> adam_settings_from(double beta1, double beta2, double eps,
                                              double weight_decay, bool decoupled, bool amsgrad,
                                              bool maximize) {
  const double one_minus_beta1 = 1.0 - beta1;
  AdamSettings<acc_t> s{};
  s.beta1 = static_cast<acc_t>(beta1);
  s.beta2 = static_cast<acc_t>(beta2);
  s.one_minus_beta1 = static_cast<acc_t>(one_minus_beta1);
  s.one_minus_beta2 = static_cast<acc_t>(1.0 - beta2);
  s.eps = static_cast<acc_t>(eps);
  s.l2_decay = static_cast<acc_t>(decoupled ? 0.0 : weight_decay);
  s.adamw_decay = static_cast<acc_t>(decoupled ? weight_decay : 0.0);
  s.small_lerp_weight = std::abs(static_cast<acc_t>(one_minus_beta1)) < acc_t(0.5);
  s.amsgrad = amsgrad;
  s.maximize = maximize;
  s.sign = maximize ? acc_t(-1) : acc_t(1);
  return s;
}

// The bias corrections of one step count t: 1 - beta1^t and sqrt(1 - beta2^t).
template <typename acc_t>
struct BiasCorrection {
  acc_t first;
  acc_t second_sqrt;
};

HYPERLR_INLINE float pow_dev(float x, float y) {
#if defined(__CUDA_ARCH__)
  return powf(x, y);
#else
  return std::pow(x, y);
#endif
}
HYPERLR_INLINE double pow_dev(double x, double y) {
#if defined(__CUDA_ARCH__)
  return pow(x, y);
#else
  return std::pow(x, y);
#endif
}

template <typename acc_t>
HYPERLR_INLINE BiasCorrection<acc_t> bias_correction(acc_t step, const AdamSettings<acc_t>& s) {
  return {add_rn(acc_t(1), -pow_dev(s.beta1, step)),
          sqrt_rn(add_rn(acc_t(1), -pow_dev(s.beta2, step)))};
}

// torch.optim.Adam's gradient: +-g, plus lambda w unless the decay is decoupled.
template <typename acc_t>
HYPERLR_INLINE acc_t adam_grad(acc_t grad, acc_t param, const AdamSettings<acc_t>& s) {
  return add_rn(mul_rn(s.sign, grad), mul_rn(s.l2_decay, param));
}

// Adam's ratio m_hat / (sqrt(v_hat) + eps) with the bias corrections c1 = 1 - beta1^t and
// c2 = 1 - beta2^t folded into two per-step constants:
//   m / c1 / (sqrt(v) / sqrt(c2) + eps) = (m * scale) / (sqrt(v) + eps_hat),
//   scale = sqrt(c2) / c1,  eps_hat = eps * sqrt(c2).
// One division and one square root per element (torch's order takes three divisions); the two
// forms agree to a few ulps. v is the second moment the step uses (the running maximum with
// amsgrad).
template <typename acc_t>
struct AdamRatio {
  acc_t scale;
  acc_t eps;
};

template <typename acc_t>
HYPERLR_INLINE AdamRatio<acc_t> adam_ratio_constants(acc_t step, const AdamSettings<acc_t>& s) {
  const BiasCorrection<acc_t> bc = bias_correction(step, s);
  return {div_rn(bc.second_sqrt, bc.first), mul_rn(s.eps, bc.second_sqrt)};
}

template <typename acc_t>
HYPERLR_INLINE acc_t adam_ratio(acc_t exp_avg, acc_t second_moment, const AdamRatio<acc_t>& r) {
  return div_rn(mul_rn(exp_avg, r.scale), add_rn(sqrt_rn(second_moment), r.eps));
}

// d = ratio (+ lambda w for AdamW): the direction the step multiplies by the LR.
template <typename acc_t>
HYPERLR_INLINE acc_t adam_direction(acc_t ratio, acc_t param, const AdamSettings<acc_t>& s) {
  return add_rn(ratio, mul_rn(s.adamw_decay, param));
}

// 1 / (1 - lambda c) for AdamW's d_{t-1} (c the LR the previous step applied); 1 otherwise.
template <typename acc_t>
HYPERLR_INLINE acc_t previous_shrink_inverse(acc_t previous_lr, const AdamSettings<acc_t>& s) {
  return div_rn(acc_t(1), add_rn(acc_t(1), -mul_rn(s.adamw_decay, previous_lr)));
}

// d_{t-1} from the moments before this step, with t-1's ratio constants. AdamW's w_{t-1} is
// gone; from w_t = w_{t-1} - c (a + lambda w_{t-1}): d_{t-1} = (a + lambda w_t) / (1 - lambda c),
// the division by the per-step ``shrink_inverse`` multiplication.
template <typename acc_t>
HYPERLR_INLINE acc_t adam_previous_direction(acc_t exp_avg, acc_t second_moment, acc_t param,
                                             acc_t shrink_inverse, const AdamRatio<acc_t>& r,
                                             const AdamSettings<acc_t>& s) {
  return mul_rn(adam_direction(adam_ratio(exp_avg, second_moment, r), param, s), shrink_inverse);
}

// torch's lerp(m, g, w): m + w (g - m) for |w| < 0.5, else g - (g - m)(1 - w), written as
// base + c (g - m) with (base, c) = (m, w) or (g, -(1 - w)): the same roundings. The base is
// picked arithmetically (x * 1 + y * 0 is x for finite y; only the sign of a zero may differ),
// which keeps the CPU element loops free of selects that GCC leaves as branches.
template <typename acc_t>
HYPERLR_INLINE acc_t lerp(acc_t start, acc_t end, acc_t weight, bool small_weight) {
  const acc_t coefficient = small_weight ? weight : -add_rn(acc_t(1), -weight);
  const acc_t from_start = small_weight ? acc_t(1) : acc_t(0);
  const acc_t base = add_rn(mul_rn(start, from_start), mul_rn(end, add_rn(acc_t(1), -from_start)));
  return add_rn(base, mul_rn(coefficient, add_rn(end, -start)));
}

// The new moments: m lerps towards g with weight 1 - beta1; v = beta2 v + (1 - beta2) g g.
template <typename acc_t>
struct AdamMoments {
  acc_t exp_avg;
  acc_t exp_avg_sq;
  acc_t max_exp_avg_sq;  // = exp_avg_sq without amsgrad
};

template <typename acc_t>
HYPERLR_INLINE AdamMoments<acc_t> adam_moments(acc_t grad, acc_t exp_avg, acc_t exp_avg_sq,
                                               acc_t max_exp_avg_sq,
                                               const AdamSettings<acc_t>& s) {
  AdamMoments<acc_t> out;
  out.exp_avg = lerp(exp_avg, grad, s.one_minus_beta1, s.small_lerp_weight);
  out.exp_avg_sq =
      add_rn(mul_rn(exp_avg_sq, s.beta2), mul_rn(mul_rn(s.one_minus_beta2, grad), grad));
  const acc_t larger = max_exp_avg_sq < out.exp_avg_sq ? out.exp_avg_sq : max_exp_avg_sq;
  out.max_exp_avg_sq = s.amsgrad ? larger : out.exp_avg_sq;
  return out;
}

}  // namespace math
}  // namespace hyperlr
