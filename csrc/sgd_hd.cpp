// Input checks and contiguity handling of the fused SGD-HD ops (csrc/sgd_hd.h).
#include "sgd_hd.h"

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

// Every tensor of `list` is a dense tensor like params[i] (dtype, device, numel).
void check_list(const char* op, const char* name, at::TensorList list, at::TensorList params,
                bool may_be_empty) {
  if (list.empty() && may_be_empty) {
    return;
  }
  TORCH_CHECK(list.size() == params.size(), op, ": ", name, " must have one tensor per param (",
              params.size(), "), got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op, ": ", name, "[", i,
                "] must be a defined dense tensor");
    TORCH_CHECK(t.scalar_type() == params[0].scalar_type(), op, ": ", name, "[", i,
                "] has dtype ", t.scalar_type(), " but params[0] has ", params[0].scalar_type());
    TORCH_CHECK(t.device() == params[0].device(), op, ": ", name, "[", i, "] is on ", t.device(),
                " but params[0] is on ", params[0].device());
    TORCH_CHECK(t.numel() == p.numel(), op, ": ", name, "[", i, "] has ", t.numel(),
                " elements but params[", i, "] has ", p.numel());
  }
}

void check_flags(const char* op, const char* name, at::IntArrayRef flags, size_t n) {
  TORCH_CHECK(flags.size() == n, op, ": ", name, " needs one flag per param (", n, "), got ",
              flags.size());
}

void check_slot_tensor(const char* op, const char* name, const at::Tensor& t, const SgdHdArgs& a) {
  const size_t n = a.params.size();
  const at::ScalarType acc = dot_result_dtype(a.params[0].scalar_type());
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D tensor");
  TORCH_CHECK(t.numel() == 1 || t.numel() == static_cast<int64_t>(n), op, ": ", name,
              " must have 1 element (one LR for all params) or one per param (", n, "), got ",
              t.numel());
  TORCH_CHECK(t.numel() == a.lrs.numel(), op, ": ", name, " and lrs must have the same length");
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " for ",
              a.params[0].scalar_type(), " params, got ", t.scalar_type());
  TORCH_CHECK(t.device() == a.params[0].device(), op, ": ", name, " is on ", t.device(),
              " but params[0] is on ", a.params[0].device());
}

// grad_scale / found_inf: absent, or one float32 element on the params' device.
void check_amp_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                      const at::Tensor& param) {
  if (!t.has_value()) {
    return;
  }
  TORCH_CHECK(t->defined() && t->numel() == 1 && t->scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 tensor with one element");
  TORCH_CHECK(t->device() == param.device(), op, ": ", name, " is on ", t->device(),
              " but params[0] is on ", param.device());
}

std::vector<at::Tensor> contiguous_or_empty(at::TensorList list) {
  return list.empty() ? std::vector<at::Tensor>{} : contiguous_list(list);
}

void copy_back_list(at::TensorList originals, const std::vector<at::Tensor>& results) {
  for (size_t i = 0; i < results.size(); ++i) {
    if (!originals[i].is_same(results[i])) {
      originals[i].copy_(results[i]);
    }
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
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              op, ": the fused SGD-HD kernels support float32, float64, bfloat16 and float16 "
              "params, got ", dtype);
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
    check_slot_tensor(op, "lrs", a.lrs, a);
    check_slot_tensor(op, "hypergrads", a.hypergrads, a);
    check_amp_tensor(op, "grad_scale", a.grad_scale, a.params[0]);
  }
  check_slot_tensor(op, "effective_lrs", a.effective_lrs, a);
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
