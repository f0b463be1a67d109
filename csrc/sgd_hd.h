// The fused SGD-HD ops, shared by the CPU kernel (sgd_hd_cpu.cpp) and the CUDA one
// (cuda/sgd_hd.cu): their arguments in one struct, the input checks (sgd_hd.cpp), and the
// functions that turn an op call into a kernel call. Schemas: csrc/schemas.cpp.
//
// Three ops (docs/design.md, "Kernel byte budgets"; the split of exact mode is cheaper than
// "dot pass + full SGD step": 6 element reads/writes instead of 7 for SGD with momentum):
//   sgd_hd_direction_    exact mode, pass 1: reads g (and w with weight decay, the validation
//                        gradient when given) and d_{t-1}; per-slot sums of <g^, d_{t-1}>, |g^|^2,
//                        |d_{t-1}|^2; writes d_t (the momentum buffer and/or prev_directions);
//                        then the HD rule of every slot (lrs, hypergrads, effective_lrs written);
//   sgd_hd_param_step_   exact mode, pass 2: w -= effective_lrs[slot] * d_t;
//   sgd_hd_lagged_step_  lr_lag=1: pass 1 and the step with lr_scale * lrs[slot] (eta_{t-1}) in
//                        one pass, then the HD rule (the new eta first acts at the next step).
// d_{t-1} is the momentum buffer before this step (plain momentum) or prev_directions (momentum 0,
// Nesterov); d_t is the new buffer or the new prev_directions.
// LR slots: lrs / hypergrads / effective_lrs are 1-D of length 1 (one slot for every tensor) or
// len(params) (slot i for tensor i), in float32 (float64 for float64 params).
// Absent lists are empty, never optional: objective_grads (no validation gradient: g^ = g~),
// momentum_buffers (momentum == 0), prev_directions (plain momentum).
// Flags per tensor as int lists of 0/1: has_previous (d_{t-1} exists; else it counts as 0),
// has_buffer (the momentum buffer holds a value; else it starts as g~, as in torch.optim.SGD).
// AMP: grad_scale (float32, one element): the gradients are g * (1 / grad_scale), GradScaler's own
// unscale; found_inf (float32, one element): when nonzero the op changes nothing.
#pragma once

#include "sgd_hd_math.h"
#include "log_lr_adam_args.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace hyperlr {

enum class SgdHdMode { kDirection, kParamStep, kLagged };

struct SgdHdArgs {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList objective_grads;
  at::TensorList momentum_buffers;
  at::TensorList prev_directions;
  at::TensorList directions;  // sgd_hd_param_step_ only: d_t
  at::IntArrayRef has_previous;
  at::IntArrayRef has_buffer;
  at::Tensor lrs;
  at::Tensor hypergrads;
  at::Tensor effective_lrs;
  std::optional<at::Tensor> grad_scale;
  std::optional<at::Tensor> found_inf;
  double lr_scale = 1.0;
  double prev_lr_scale = 1.0;
  double hyper_lr = 0.0;
  double weight_decay = 0.0;
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;
  bool maximize = false;
  bool multiplicative = false;
  LogLrAdamArgs log_lr_adam;  // the Adam hyper-optimizer on log eta, when given
};

// Contiguous versions of the tensor lists (the same tensors when already contiguous).
struct SgdHdTensors {
  std::vector<at::Tensor> params, grads, objective_grads, momentum_buffers, prev_directions,
      directions;
};

// Throws, naming the argument, unless the lists and flags fit the mode (see the top comment).
void check_sgd_hd_args(SgdHdMode mode, const SgdHdArgs& a);

SgdHdTensors contiguous_tensors(const SgdHdArgs& a);

// Copies the results of non-contiguous mutable tensors back from their contiguous versions.
void copy_back(const SgdHdArgs& a, const SgdHdTensors& t);


template <typename acc_t>
math::SgdSettings<acc_t> sgd_settings(const SgdHdArgs& a) {
  return math::sgd_settings_from<acc_t>(a.weight_decay, a.momentum, a.dampening, a.nesterov,
                                        a.maximize);
}

template <typename acc_t>
math::HdRuleSettings<acc_t> rule_settings(const SgdHdArgs& a, bool lr_lag) {
  return hd_rule_settings<acc_t>(a.hyper_lr, a.prev_lr_scale, a.lr_scale, a.multiplicative,
                                   lr_lag, a.log_lr_adam);
}

using SgdHdKernel = void (*)(SgdHdMode, const SgdHdArgs&);

// sgd_hd_direction_ and sgd_hd_lagged_step_ have the same arguments.
template <SgdHdKernel kernel, SgdHdMode kMode>
void sgd_hd_reducing_op(at::TensorList params, at::TensorList grads,
                        at::TensorList objective_grads, at::TensorList momentum_buffers,
                        at::TensorList prev_directions, at::IntArrayRef has_previous,
                        at::IntArrayRef has_buffer, const at::Tensor& lrs,
                        const at::Tensor& hypergrads, const at::Tensor& effective_lrs,
                        double lr_scale, double prev_lr_scale, double hyper_lr,
                        double weight_decay, double momentum, double dampening, bool nesterov,
                        bool maximize, bool multiplicative,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf,
                        const std::optional<at::Tensor>& hyper_state,
                        at::ArrayRef<double> hyper_adam) {
  SgdHdArgs a;
  a.params = params;
  a.grads = grads;
  a.objective_grads = objective_grads;
  a.momentum_buffers = momentum_buffers;
  a.prev_directions = prev_directions;
  a.has_previous = has_previous;
  a.has_buffer = has_buffer;
  a.lrs = lrs;
  a.hypergrads = hypergrads;
  a.effective_lrs = effective_lrs;
  a.grad_scale = grad_scale;
  a.found_inf = found_inf;
  a.lr_scale = lr_scale;
  a.prev_lr_scale = prev_lr_scale;
  a.hyper_lr = hyper_lr;
  a.weight_decay = weight_decay;
  a.momentum = momentum;
  a.dampening = dampening;
  a.nesterov = nesterov;
  a.maximize = maximize;
  a.multiplicative = multiplicative;
  a.log_lr_adam = {hyper_state, hyper_adam.vec()};
  kernel(kMode, a);
}

template <SgdHdKernel kernel>
void sgd_hd_param_step_op(at::TensorList params, at::TensorList directions,
                          const at::Tensor& effective_lrs,
                          const std::optional<at::Tensor>& found_inf) {
  SgdHdArgs a;
  a.params = params;
  a.directions = directions;
  a.effective_lrs = effective_lrs;
  a.lrs = effective_lrs;  // only its length (the number of slots) is used
  a.found_inf = found_inf;
  kernel(SgdHdMode::kParamStep, a);
}

}  // namespace hyperlr
