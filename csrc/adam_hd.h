// The fused Adam-HD ops, shared by the CPU kernel (adam_hd_cpu.cpp) and the CUDA one
// (cuda/adam_hd.cu): their arguments, the input checks (adam_hd.cpp) and the op-to-kernel glue.
// Schemas: csrc/schemas.cpp; caller: hyperlr_ext/functional/_adam_hd_fused.py.
//
//   adam_hd_moments_     exact mode, pass 1: reads g (the validation gradient when given, w when
//                        weight decay needs it) and the moments; per-slot sums of <g^, d_{t-1}>,
//                        |g^|^2, |d_{t-1}|^2 with d_{t-1} recomputed from the moments before they
//                        change; writes the new m, v (and max v); then the HD rule of every slot;
//   adam_hd_param_step_  exact mode, pass 2: w -= effective_lrs[slot] * d_t (d_t from the new
//                        moments, + lambda w for AdamW);
//   adam_hd_lagged_step_ lr_lag=1: both in one pass with lr_scale * lrs[slot] (eta_{t-1}).
// Byte count per element (fp32): 5 + 4 = 9 reads and writes in exact mode, torch's 7 lagged.
// `steps` is a 1-D tensor of len(params) holding each tensor's step count t of this step (already
// incremented), in the LR dtype; d_{t-1} uses t - 1. AdamW's d_{t-1} needs the LR the previous
// step applied: effective_lrs on entry. has_previous: 0/1 per tensor (else d_{t-1} counts as 0).
// second_moments for the param step: exp_avg_sqs, or max_exp_avg_sqs with amsgrad.
// AMP: grad_scale and found_inf as in csrc/sgd_hd.h.
#pragma once

#include "adam_hd_math.h"
#include "log_lr_adam_args.h"

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>
#include <vector>

namespace hyperlr {

enum class AdamHdMode { kMoments, kParamStep, kLagged };

struct AdamHdArgs {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList objective_grads;
  at::TensorList exp_avgs;
  at::TensorList exp_avg_sqs;
  at::TensorList max_exp_avg_sqs;  // amsgrad only (param step: the second moments it uses)
  at::Tensor steps;
  at::IntArrayRef has_previous;
  at::Tensor lrs;
  at::Tensor hypergrads;
  at::Tensor effective_lrs;
  std::optional<at::Tensor> grad_scale;
  std::optional<at::Tensor> found_inf;
  double lr_scale = 1.0;
  double prev_lr_scale = 1.0;
  double hyper_lr = 0.0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = false;
  bool amsgrad = false;
  bool maximize = false;
  bool multiplicative = false;
  LogLrAdamArgs log_lr_adam;  // the Adam hyper-optimizer on log eta, when given
};

struct AdamHdTensors {
  std::vector<at::Tensor> params, grads, objective_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs;
};

void check_adam_hd_args(AdamHdMode mode, const AdamHdArgs& a);
AdamHdTensors contiguous_tensors(const AdamHdArgs& a);
void copy_back(const AdamHdArgs& a, const AdamHdTensors& t);

template <typename acc_t>
math::AdamSettings<acc_t> adam_settings(const AdamHdArgs& a) {
  return math::adam_settings_from<acc_t>(a.beta1, a.beta2, a.eps, a.weight_decay, a.decoupled,
                                         a.amsgrad, a.maximize);
}

template <typename acc_t>
math::HdRuleSettings<acc_t> rule_settings(const AdamHdArgs& a, bool lr_lag) {
  return hd_rule_settings<acc_t>(a.hyper_lr, a.prev_lr_scale, a.lr_scale, a.multiplicative,
                                   lr_lag, a.log_lr_adam);
}

using AdamHdKernel = void (*)(AdamHdMode, const AdamHdArgs&);

// adam_hd_moments_ and adam_hd_lagged_step_ have the same arguments.
template <AdamHdKernel kernel, AdamHdMode kMode>
void adam_hd_reducing_op(at::TensorList params, at::TensorList grads,
                         at::TensorList objective_grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         const at::Tensor& steps, at::IntArrayRef has_previous,
                         const at::Tensor& lrs, const at::Tensor& hypergrads,
                         const at::Tensor& effective_lrs, double lr_scale, double prev_lr_scale,
                         double hyper_lr, double beta1, double beta2, double eps,
                         double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                         bool multiplicative, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& hyper_state,
                         at::ArrayRef<double> hyper_adam) {
  AdamHdArgs a;
  a.params = params;
  a.grads = grads;
  a.objective_grads = objective_grads;
  a.exp_avgs = exp_avgs;
  a.exp_avg_sqs = exp_avg_sqs;
  a.max_exp_avg_sqs = max_exp_avg_sqs;
  a.steps = steps;
  a.has_previous = has_previous;
  a.lrs = lrs;
  a.hypergrads = hypergrads;
  a.effective_lrs = effective_lrs;
  a.grad_scale = grad_scale;
  a.found_inf = found_inf;
  a.lr_scale = lr_scale;
  a.prev_lr_scale = prev_lr_scale;
  a.hyper_lr = hyper_lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.decoupled = decoupled;
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  a.multiplicative = multiplicative;
  a.log_lr_adam = {hyper_state, hyper_adam.vec()};
  kernel(kMode, a);
}

template <AdamHdKernel kernel>
void adam_hd_param_step_op(at::TensorList params, at::TensorList exp_avgs,
                           at::TensorList second_moments, const at::Tensor& steps,
                           const at::Tensor& effective_lrs, double beta1, double beta2,
                           double eps, double weight_decay, bool decoupled,
                           const std::optional<at::Tensor>& found_inf) {
  AdamHdArgs a;
  a.params = params;
  a.exp_avgs = exp_avgs;
  a.exp_avg_sqs = second_moments;
  a.steps = steps;
  a.effective_lrs = effective_lrs;
  a.lrs = effective_lrs;  // only its length (the number of slots) is used
  a.found_inf = found_inf;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.decoupled = decoupled;
  kernel(AdamHdMode::kParamStep, a);
}

}  // namespace hyperlr
