// Layer 1 of the fused SGD-HD kernels (docs/design.md, Conventions): one element of
// torch.optim.SGD's step and of the hypergradient sums, and the HD rule of one LR slot, on
// registers. Shared by the CPU kernel (csrc/sgd_hd_cpu.cpp) and the CUDA functors
// (csrc/cuda/sgd_hd.cu), so both compute the same arithmetic in the same order. Equations:
// docs/design.md, HD; the reference is hyperlr_ext/functional/sgd_hd.py (_single_tensor_sgd_hd)
// and _hd_rule.hd_rule_.
#pragma once

#include "hd_math.h"

#include <cmath>

namespace hyperlr {
namespace math {

// The settings of torch.optim.SGD's inner step, in the accumulation type.
template <typename acc_t>
struct SgdSettings {
  acc_t weight_decay;
  acc_t momentum;
  acc_t one_minus_dampening;
  bool nesterov;
  bool maximize;
  bool has_momentum;  // momentum != 0
};

// g / S as GradScaler unscales it: g * (1 / S) (exactly g when inv_scale is 1).
template <typename acc_t>
HYPERLR_INLINE acc_t unscale(acc_t grad, acc_t inv_scale) {
  return mul_rn(grad, inv_scale);
}

// g~ = (+-g) + lambda w: torch.optim.SGD's decayed gradient (the training objective's gradient).
template <typename acc_t>
HYPERLR_INLINE acc_t decayed_grad(acc_t grad, acc_t param, const SgdSettings<acc_t>& s) {
  // Both sides are computed and one is selected (no branch: the CPU loops vectorise).
  const acc_t signed_grad = s.maximize ? -grad : grad;
  const acc_t with_decay = add_rn(signed_grad, mul_rn(s.weight_decay, param));
  return s.weight_decay != acc_t(0) ? with_decay : signed_grad;
}

// g^ with a validation objective: +-(validation gradient), no decay (docs/design.md, HD).
template <typename acc_t>
HYPERLR_INLINE acc_t validation_objective(acc_t objective_grad, const SgdSettings<acc_t>& s) {
  return s.maximize ? -objective_grad : objective_grad;
}

// The running sums of one lane: <g^, d_{t-1}>, |g^|^2 and |d_{t-1}|^2.
template <typename acc_t>
struct HdSums {
  acc_t dot;
  acc_t grad_sq;
  acc_t dir_sq;
};

// Adds one element to a lane's sums; d_{t-1} counts only when the tensor has one.
template <typename acc_t>
HYPERLR_INLINE void hd_sums_step(HdSums<acc_t>& sums, acc_t objective, acc_t previous,
                                 bool has_previous) {
  sums.grad_sq = dot_step(sums.grad_sq, objective, objective);
  const acc_t dot = dot_step(sums.dot, objective, previous);
  const acc_t dir_sq = dot_step(sums.dir_sq, previous, previous);
  sums.dot = has_previous ? dot : sums.dot;
  sums.dir_sq = has_previous ? dir_sq : sums.dir_sq;
}

// The new momentum buffer: b = m b + (1 - dampening) g~, or g~ on the tensor's first step.
template <typename acc_t>
HYPERLR_INLINE acc_t momentum_buffer_step(acc_t buffer, acc_t decayed, bool has_buffer,
                                          const SgdSettings<acc_t>& s) {
  const acc_t accumulated =
      add_rn(mul_rn(buffer, s.momentum), mul_rn(s.one_minus_dampening, decayed));
  return has_buffer ? accumulated : decayed;
}

// Nesterov's d_t = g~ + m b, with the updated buffer b.
template <typename acc_t>
HYPERLR_INLINE acc_t nesterov_direction(acc_t decayed, acc_t buffer, const SgdSettings<acc_t>& s) {
  return add_rn(decayed, mul_rn(s.momentum, buffer));
}

// d_t: g~ (no momentum), the buffer, or g~ + m b (Nesterov); `buffer` is the updated one.
template <typename acc_t>
HYPERLR_INLINE acc_t update_direction(acc_t decayed, acc_t buffer, const SgdSettings<acc_t>& s) {
  const acc_t nesterov = nesterov_direction(decayed, buffer, s);
  const acc_t with_momentum = s.nesterov ? nesterov : buffer;
  return s.has_momentum ? with_momentum : decayed;
}

// Which lists one element's step has, and its flags. The CPU kernel builds it from template
// constants (so the selects below fold away), the CUDA functors from runtime values.
struct StepFlags {
  bool has_objective;    // a validation gradient is given (g^ = its +-, not g~)
  bool has_momentum;     // momentum != 0: a momentum buffer
  bool nesterov;         // d_t = g~ + m b
  bool keeps_direction;  // d is kept in prev_directions (no momentum, or Nesterov)
  bool has_buffer;       // the buffer holds a value (else it starts as g~)
  bool has_previous;     // d_{t-1} exists (else it counts as 0)
};

// One element of pass 1 (and of the lagged pass): its g^ and d_{t-1} for the sums, its new buffer
// and d_t.
template <typename acc_t>
struct DirectionStep {
  acc_t objective;
  acc_t previous;
  acc_t buffer;
  acc_t direction;
};

// From the unscaled g, w (any value when there is no weight decay), the validation gradient, the
// old buffer and the kept d_{t-1} (any value where absent).
template <typename acc_t>
HYPERLR_INLINE DirectionStep<acc_t> direction_step(acc_t grad, acc_t weight, acc_t objective_grad,
                                                   acc_t old_buffer, acc_t old_direction,
                                                   const StepFlags& f,
                                                   const SgdSettings<acc_t>& s) {
  DirectionStep<acc_t> e;
  const acc_t decayed = decayed_grad(grad, weight, s);
  e.objective = f.has_objective ? validation_objective(objective_grad, s) : decayed;
  const acc_t previous = f.keeps_direction ? old_direction : old_buffer;
  e.previous = f.has_previous ? previous : acc_t(0);
  e.buffer = f.has_momentum ? momentum_buffer_step(old_buffer, decayed, f.has_buffer, s) : acc_t(0);
  const acc_t with_momentum = f.nesterov ? nesterov_direction(decayed, e.buffer, s) : e.buffer;
  e.direction = f.has_momentum ? with_momentum : decayed;
  return e;
}

// w - lr * d (torch's addcmul_(d, -lr) on the parameter).
template <typename acc_t>
HYPERLR_INLINE acc_t param_step(acc_t param, acc_t direction, acc_t effective_lr) {
  return add_rn(param, mul_rn(direction, -effective_lr));
}

// Correctly rounded square root on the host and the device.
HYPERLR_INLINE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
HYPERLR_INLINE double sqrt_rn(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// Correctly rounded division (also under nvcc's -prec-div=false).
HYPERLR_INLINE float div_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(x, y);
#else
  return x / y;
#endif
}
HYPERLR_INLINE double div_rn(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(x, y);
#else
  return x / y;
#endif
}

// The reciprocal of AMP's grad scale, in float32 like GradScaler's inv_scale (1 without a scaler).
HYPERLR_INLINE float inverse_grad_scale(const float* grad_scale) {
  return grad_scale == nullptr ? 1.0f : div_rn(1.0f, *grad_scale);
}

// True when AMP found an inf/NaN gradient: the step must change nothing.
HYPERLR_INLINE bool skips_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// The settings of the HD rule (hyperlr_ext/functional/_hd_rule.py, hd_rule_).
template <typename acc_t>
struct HdRuleSettings {
  acc_t hyper_lr;
  acc_t prev_lr_scale;  // s_{t-1}
  acc_t lr_scale;       // s_t
  bool multiplicative;
  bool lr_lag;  // the step applies eta_{t-1}, not eta_t
};

// The smallest positive normal number (torch.finfo(dtype).tiny).
template <typename acc_t>
HYPERLR_INLINE acc_t tiny_normal();
template <>
HYPERLR_INLINE float tiny_normal<float>() {
  return 1.17549435e-38f;
}
template <>
HYPERLR_INLINE double tiny_normal<double>() {
  return 2.2250738585072014e-308;
}

// One slot's LR update from its reduced sums: h = s_{t-1} <g^, d_{t-1}>;
// additive eta + beta h, multiplicative eta (1 + beta h / (|g^| |s_{t-1} d_{t-1}|)); clamp at 0
// (NaN stays NaN, like clamp_min); hypergrad = -h; the applied LR times s_t is the effective LR.
template <typename acc_t>
HYPERLR_INLINE void hd_rule(acc_t& lr, acc_t& hypergrad, acc_t& effective_lr,
                            const HdSums<acc_t>& sums, const HdRuleSettings<acc_t>& r) {
  const acc_t old_lr = lr;
  const acc_t h = mul_rn(sums.dot, r.prev_lr_scale);
  acc_t new_lr;
  if (r.multiplicative) {
    const acc_t abs_scale = r.prev_lr_scale < acc_t(0) ? -r.prev_lr_scale : r.prev_lr_scale;
    acc_t norms = mul_rn(mul_rn(sqrt_rn(sums.grad_sq), sqrt_rn(sums.dir_sq)), abs_scale);
    norms = norms < tiny_normal<acc_t>() ? tiny_normal<acc_t>() : norms;
    const acc_t cosine = div_rn(h, norms);
    new_lr = mul_rn(old_lr, add_rn(acc_t(1), mul_rn(r.hyper_lr, cosine)));
  } else {
    new_lr = add_rn(old_lr, mul_rn(r.hyper_lr, h));
  }
  lr = new_lr < acc_t(0) ? acc_t(0) : new_lr;
  hypergrad = -h;
  effective_lr = mul_rn(r.lr_lag ? old_lr : lr, r.lr_scale);
}

}  // namespace math
}  // namespace hyperlr
