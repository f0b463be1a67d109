// The fused tangent step of MARTHE / RTHO (docs/design.md, "Kernel byte budgets"):
// one pass over every tensor that applies the inner optimizer's step and updates the tangents of
// the weights and of every state buffer, Z <- mu (A Z) + B. Shared by the CPU kernel
// (tangent_cpu.cpp) and the CUDA one (cuda/tangent.cu); checks in tangent.cpp; schemas in ops.cpp;
// math in tangent_math.h; Python side: hyperlr_ext/functional/_marthe_fused.py.
//
//   tangent_sgd_step_(params, grads, hvps, momentum_buffers, z_params, z_buffers, directions,
//                     lr, mu, lr_scale, momentum, dampening, nesterov, weight_decay, first_step,
//                     found_inf=None)
//   tangent_adam_step_(params, grads, hvps, exp_avgs, exp_avg_sqs, z_params, z_exp_avgs,
//                      z_exp_avg_sqs, directions, lr, mu, step, lr_scale, beta1, beta2, eps,
//                      weight_decay, decoupled_weight_decay, found_inf=None)
//
// hvps is empty when no Hessian product was computed (it then counts as 0); directions is empty
// when d_t is not kept (only MARTHE's adaptive mu reads it); momentum_buffers and z_buffers are
// empty exactly when momentum == 0. lr (the learned eta), mu and step (Adam's step
// count t, already incremented) are 0-dim tensors on the params' device in float32 (float64 for
// float64 params), read by the kernel: nothing is synchronised. found_inf (absent, or one float32
// element on the params' device): when nonzero the op changes nothing (a skipped AMP step).
#pragma once

#include "tangent_math.h"

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <vector>

namespace hyperlr {

enum class TangentInner { kSgd, kAdam };

// List slots, the same for both inner optimizers (SGD leaves kState1 / kZState1 empty).
enum TangentList : int {
  kParams, kGrads, kHvps, kState0, kState1, kZParams, kZState0, kZState1, kDirections,
  kNumTangentLists
};

struct TangentArgs {
  TangentInner inner = TangentInner::kSgd;
  std::array<at::TensorList, kNumTangentLists> lists;
  at::Tensor lr;
  at::Tensor mu;
  at::Tensor step;  // Adam only
  double lr_scale = 1.0;
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;
  bool first_step = false;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled_weight_decay = false;
  std::optional<at::Tensor> found_inf;
};

// Throws, naming the op and the argument, unless the lists and scalars fit (see above).
void check_tangent_args(const TangentArgs& a);

// Contiguous versions of the lists (the same tensors when already contiguous) and the copy of
// the mutated ones back into non-contiguous originals.
std::array<std::vector<at::Tensor>, kNumTangentLists> contiguous_tangent_lists(const TangentArgs& a);
void copy_back_tangent_lists(const TangentArgs& a,
                             const std::array<std::vector<at::Tensor>, kNumTangentLists>& t);

template <typename acc_t>
math::SgdSettings<acc_t> tangent_sgd_settings(const TangentArgs& a) {
  return math::sgd_settings_from<acc_t>(a.weight_decay, a.momentum, a.dampening, a.nesterov,
                                        /*maximize=*/false);
}

template <typename acc_t>
math::AdamSettings<acc_t> tangent_adam_settings(const TangentArgs& a) {
  return math::adam_settings_from<acc_t>(a.beta1, a.beta2, a.eps, a.weight_decay,
                                         a.decoupled_weight_decay, /*amsgrad=*/false,
                                         /*maximize=*/false);
}

// 2 (1 - beta2), formed in double as the reference's Python arithmetic does.
template <typename acc_t>
acc_t two_one_minus_beta2(const TangentArgs& a) {
  return static_cast<acc_t>(2.0 * (1.0 - a.beta2));
}

using TangentKernel = void (*)(const TangentArgs&);

template <TangentKernel kernel>
void tangent_sgd_step_op(at::TensorList params, at::TensorList grads, at::TensorList hvps,
                         at::TensorList momentum_buffers, at::TensorList z_params,
                         at::TensorList z_buffers, at::TensorList directions,
                         const at::Tensor& lr, const at::Tensor& mu, double lr_scale,
                         double momentum, double dampening, bool nesterov, double weight_decay,
                         bool first_step, const std::optional<at::Tensor>& found_inf) {
  TangentArgs a;
  a.inner = TangentInner::kSgd;
  a.lists = {params, grads, hvps, momentum_buffers, at::TensorList(), z_params, z_buffers,
             at::TensorList(), directions};
  a.lr = lr;
  a.mu = mu;
  a.lr_scale = lr_scale;
  a.momentum = momentum;
  a.dampening = dampening;
  a.nesterov = nesterov;
  a.weight_decay = weight_decay;
  a.first_step = first_step;
  a.found_inf = found_inf;
  kernel(a);
}

template <TangentKernel kernel>
void tangent_adam_step_op(at::TensorList params, at::TensorList grads, at::TensorList hvps,
                          at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                          at::TensorList z_params, at::TensorList z_exp_avgs,
                          at::TensorList z_exp_avg_sqs, at::TensorList directions,
                          const at::Tensor& lr, const at::Tensor& mu, const at::Tensor& step,
                          double lr_scale, double beta1, double beta2, double eps,
                          double weight_decay, bool decoupled_weight_decay,
                          const std::optional<at::Tensor>& found_inf) {
  TangentArgs a;
  a.inner = TangentInner::kAdam;
  a.lists = {params, grads, hvps, exp_avgs, exp_avg_sqs, z_params, z_exp_avgs, z_exp_avg_sqs,
             directions};
  a.lr = lr;
  a.mu = mu;
  a.step = step;
  a.lr_scale = lr_scale;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.decoupled_weight_decay = decoupled_weight_decay;
  a.found_inf = found_inf;
  kernel(a);
}

}  // namespace hyperlr
