// Input checks and contiguity handling of the fused SGD-HD ops (csrc/sgd_hd.h).
#include "sgd_hd.h"

#include "fused_args.h"
#include "ops.h"

#include <c10/util/Exception.h>

#include <string>

namespace hyperlr {
namespace {

const char* op_name(SgdHdMode mode) {
  switch (mode) {
    case SgdHdMode::kDirection:
      return "sgd_hd_direction_";
    case SgdHdMode::kParamStep:
      return "sgd_hd_param_step_";
    default:
      return "sgd_hd_lagged_step_";
  }
}

}  // namespace

void check_sgd_hd_args(SgdHdMode mode, const SgdHdArgs& a) {
  const char* op = op_name(mode);
  const size_t n = a.params.size();
  if (n == 0) {
    return;
  }
  const at::ScalarType dtype = a.params[0].scalar_type();
  check_fused_dtype(op, "SGD-HD", dtype);
  check_list(op, "params", a.params, a.params, false);
  check_amp_tensor(op, "found_inf", a.found_inf, a.params[0]);
  if (mode == SgdHdMode::kParamStep) {
    check_list(op, "directions", a.directions, a.params, false);
  } else {
    const bool has_momentum = a.momentum != 0.0;
    const bool keeps_direction = !has_momentum || a.nesterov;
    check_list(op, "grads", a.grads, a.params, false);
    check_list(op, "objective_grads", a.objective_grads, a.params, true);
    TORCH_CHECK(a.momentum_buffers.empty() != has_momentum, op,
                ": momentum_buffers must be given exactly when momentum != 0");
    TORCH_CHECK(a.prev_directions.empty() != keeps_direction, op,
                ": prev_directions must be given exactly when momentum == 0 or nesterov");
    check_list(op, "momentum_buffers", a.momentum_buffers, a.params, true);
    check_list(op, "prev_directions", a.prev_directions, a.params, true);
    if (has_momentum) {
      check_flags(op, "has_buffer", a.has_buffer, n);
    }
    check_flags(op, "has_previous", a.has_previous, n);
    check_slot_tensor(op, "lrs", a.lrs, a.params, a.lrs.numel());
    check_slot_tensor(op, "hypergrads", a.hypergrads, a.params, a.lrs.numel());
    check_log_lr_adam(op, a.log_lr_adam, a.lrs);
    check_amp_tensor(op, "grad_scale", a.grad_scale, a.params[0]);
  }
  check_slot_tensor(op, "effective_lrs", a.effective_lrs, a.params, a.lrs.numel());
}

SgdHdTensors contiguous_tensors(const SgdHdArgs& a) {
  SgdHdTensors t;
  t.params = contiguous_list(a.params);
  t.grads = contiguous_or_empty(a.grads);
  t.objective_grads = contiguous_or_empty(a.objective_grads);
  t.momentum_buffers = contiguous_or_empty(a.momentum_buffers);
  t.prev_directions = contiguous_or_empty(a.prev_directions);
  t.directions = contiguous_or_empty(a.directions);
  return t;
}

void copy_back(const SgdHdArgs& a, const SgdHdTensors& t) {
  copy_back_list(a.params, t.params);
  copy_back_list(a.momentum_buffers, t.momentum_buffers);
  copy_back_list(a.prev_directions, t.prev_directions);
}

}  // namespace hyperlr
