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

// The settings from torch.optim.SGD's arguments, built on the host; every op with an SGD step
// builds them here.
template <typename acc_t>
inline SgdSettings<acc_t> sgd_settings_from(double weight_decay, double momentum,
                                            double dampening, bool nesterov, bool maximize) {
  return {static_cast<acc_t>(weight_decay), static_cast<acc_t>(momentum),
          static_cast<acc_t>(1.0 - dampening), nesterov, maximize, momentum != 0.0};
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

}  // namespace math
}  // namespace hyperlr
