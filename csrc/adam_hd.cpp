// Input checks and contiguity handling of the fused Adam-HD ops (csrc/adam_hd.h).
#include "adam_hd.h"

#include "fused_args.h"
#include "ops.h"

#include <c10/util/Exception.h>

namespace hyperlr {
namespace {

const char* op_name(AdamHdMode mode) {
  switch (mode) {
    case AdamHdMode::kMoments:
      return "adam_hd_moments_";
    case AdamHdMode::kParamStep:
      return "adam_hd_param_step_";
    default:
      return "adam_hd_lagged_step_";
  }
}

}  // namespace

void check_adam_hd_args(AdamHdMode mode, const AdamHdArgs& a) {
  const char* op = op_name(mode);
  const size_t n = a.params.size();
  if (n == 0) {
    return;
  }
  check_fused_dtype(op, "Adam-HD", a.params[0].scalar_type());
  check_list(op, "params", a.params, a.params, false);
  check_list(op, "exp_avgs", a.exp_avgs, a.params, false);
  const bool param_step = mode == AdamHdMode::kParamStep;
  check_list(op, param_step ? "second_moments" : "exp_avg_sqs", a.exp_avg_sqs, a.params, false);
  const at::ScalarType acc = dot_result_dtype(a.params[0].scalar_type());
  TORCH_CHECK(a.steps.defined() && a.steps.dim() == 1 &&
                  a.steps.numel() == static_cast<int64_t>(n) && a.steps.is_contiguous(),
              op, ": steps must be a contiguous 1-D tensor with one step count per param (", n,
              ")");
  TORCH_CHECK(a.steps.scalar_type() == acc && a.steps.device() == a.params[0].device(), op,
              ": steps must be ", acc, " on ", a.params[0].device(), ", got ",
              a.steps.scalar_type(), " on ", a.steps.device());
  check_amp_tensor(op, "found_inf", a.found_inf, a.params[0]);
  if (!param_step) {
    check_list(op, "grads", a.grads, a.params, false);
    check_list(op, "objective_grads", a.objective_grads, a.params, true);
    TORCH_CHECK(a.max_exp_avg_sqs.empty() != a.amsgrad, op,
                ": max_exp_avg_sqs must be given exactly when amsgrad is set");
    check_list(op, "max_exp_avg_sqs", a.max_exp_avg_sqs, a.params, true);
    check_flags(op, "has_previous", a.has_previous, n);
    check_slot_tensor(op, "lrs", a.lrs, a.params, a.lrs.numel());
    check_slot_tensor(op, "hypergrads", a.hypergrads, a.params, a.lrs.numel());
    check_log_lr_adam(op, a.log_lr_adam, a.lrs);
    check_amp_tensor(op, "grad_scale", a.grad_scale, a.params[0]);
  }
  check_slot_tensor(op, "effective_lrs", a.effective_lrs, a.params, a.lrs.numel());
}

AdamHdTensors contiguous_tensors(const AdamHdArgs& a) {
  AdamHdTensors t;
  t.params = contiguous_list(a.params);
  t.grads = contiguous_or_empty(a.grads);
  t.objective_grads = contiguous_or_empty(a.objective_grads);
  t.exp_avgs = contiguous_or_empty(a.exp_avgs);
  t.exp_avg_sqs = contiguous_or_empty(a.exp_avg_sqs);
  t.max_exp_avg_sqs = contiguous_or_empty(a.max_exp_avg_sqs);
  return t;
}

void copy_back(const AdamHdArgs& a, const AdamHdTensors& t) {
  copy_back_list(a.params, t.params);
  copy_back_list(a.exp_avgs, t.exp_avgs);
  copy_back_list(a.exp_avg_sqs, t.exp_avg_sqs);
  copy_back_list(a.max_exp_avg_sqs, t.max_exp_avg_sqs);
}

}  // namespace hyperlr
