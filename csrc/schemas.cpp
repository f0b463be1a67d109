// The op schemas of the library, defined once: hyperlr_ext (csrc/ops.cpp) and the test-only
// emulation library hyperlr_ext_emu (tests/cuda_emu/module.cpp) both take them from here.
#include "ops.h"

#include <torch/library.h>

namespace hyperlr {

void define_ops(torch::Library& m) {
  // sum_i <a[i], b[i]> as a 0-dim tensor on the inputs' device: float32 accumulation and result
  // (float64 for float64 inputs), fixed reduction order (deterministic).
  m.def("multi_tensor_dot(Tensor[] a, Tensor[] b) -> Tensor", {at::Tag::pt2_compliant_tag});
  // Fused SGD-HD (csrc/sgd_hd.h explains the arguments; hyperlr_ext/functional/_sgd_hd_fused.py
  // calls them). Exact mode: sgd_hd_direction_ then sgd_hd_param_step_; lr_lag=1:
  // sgd_hd_lagged_step_.
  m.def(
      "sgd_hd_direction_(Tensor[] params, Tensor[] grads, Tensor[] objective_grads, "
      "Tensor(a!)[] momentum_buffers, Tensor(b!)[] prev_directions, int[] has_previous, "
      "int[] has_buffer, Tensor(c!) lrs, Tensor(d!) hypergrads, Tensor(e!) effective_lrs, "
      "float lr_scale, float prev_lr_scale, float hyper_lr, float weight_decay, "
      "float momentum, float dampening, bool nesterov, bool maximize, bool multiplicative, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(f!)? hyper_state=None, "
      "float[] hyper_adam=[]) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sgd_hd_param_step_(Tensor(a!)[] params, Tensor[] directions, Tensor effective_lrs, "
      "Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sgd_hd_lagged_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] objective_grads, "
      "Tensor(b!)[] momentum_buffers, Tensor(c!)[] prev_directions, int[] has_previous, "
      "int[] has_buffer, Tensor(d!) lrs, Tensor(e!) hypergrads, Tensor(f!) effective_lrs, "
      "float lr_scale, float prev_lr_scale, float hyper_lr, float weight_decay, "
      "float momentum, float dampening, bool nesterov, bool maximize, bool multiplicative, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(g!)? hyper_state=None, "
      "float[] hyper_adam=[]) -> ()",
      {at::Tag::pt2_compliant_tag});
  // Fused Adam-HD (csrc/adam_hd.h; hyperlr_ext/functional/_adam_hd_fused.py). Exact mode:
  // adam_hd_moments_ then adam_hd_param_step_; lr_lag=1: adam_hd_lagged_step_.
  m.def(
      "adam_hd_moments_(Tensor[] params, Tensor[] grads, Tensor[] objective_grads, "
      "Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, Tensor(c!)[] max_exp_avg_sqs, "
      "Tensor steps, int[] has_previous, Tensor(d!) lrs, Tensor(e!) hypergrads, "
      "Tensor(f!) effective_lrs, float lr_scale, float prev_lr_scale, float hyper_lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool amsgrad, bool maximize, bool multiplicative, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(g!)? hyper_state=None, "
      "float[] hyper_adam=[]) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "adam_hd_param_step_(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] second_moments, "
      "Tensor steps, Tensor effective_lrs, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled_weight_decay, Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "adam_hd_lagged_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] objective_grads, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
      "Tensor steps, int[] has_previous, Tensor(e!) lrs, Tensor(f!) hypergrads, "
      "Tensor(g!) effective_lrs, float lr_scale, float prev_lr_scale, float hyper_lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool amsgrad, bool maximize, bool multiplicative, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(h!)? hyper_state=None, "
      "float[] hyper_adam=[]) -> ()",
      {at::Tag::pt2_compliant_tag});
  // The fused tangent step of MARTHE / RTHO (csrc/tangent.h; hyperlr_ext/functional/
  // _marthe_fused.py): the inner step and the tangent update of every state buffer, one pass.
  m.def(
      "tangent_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] hvps, "
      "Tensor(b!)[] momentum_buffers, Tensor(c!)[] z_params, Tensor(d!)[] z_buffers, "
      "Tensor(e!)[] directions, Tensor lr, Tensor mu, float lr_scale, float momentum, "
      "float dampening, bool nesterov, float weight_decay, bool first_step, "
      "Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "tangent_adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] hvps, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] z_params, "
      "Tensor(e!)[] z_exp_avgs, Tensor(f!)[] z_exp_avg_sqs, Tensor(g!)[] directions, "
      "Tensor lr, Tensor mu, Tensor step, float lr_scale, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled_weight_decay, Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  // The fused TLR window end (csrc/tlr.h; hyperlr_ext/functional/tlr.py): u, the two sums and
  // the new snapshot in one pass; returns [<u_prev, u>, |u_prev|^2].
  m.def(
      "tlr_window_(Tensor[] params, Tensor(a!)[] snapshots, Tensor(b!)[] prev_updates, "
      "Tensor lr, bool has_previous) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The fused HyperLR pass (csrc/hyper_lr.h; hyperlr_ext/functional/hyper_lr.py): the three HD
  // sums of every LR slot and the new snapshots in one pass; returns [3, num_slots].
  m.def(
      "hyper_lr_sums_(Tensor[] params, Tensor[] grads, Tensor(a!)[] snapshots, "
      "int[] has_previous, int num_slots, float weight_decay, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

}  // namespace hyperlr
