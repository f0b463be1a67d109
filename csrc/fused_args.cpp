// Argument checks and contiguity helpers shared by the fused ops (csrc/fused_args.h).
#include "fused_args.h"
#include "log_lr_adam_args.h"

#include "ops.h"

#include <c10/util/Exception.h>

namespace hyperlr {

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

void check_slot_tensor(const char* op, const char* name, const at::Tensor& t,
                       at::TensorList params, int64_t num_slots) {
  const size_t n = params.size();
  const at::ScalarType acc = dot_result_dtype(params[0].scalar_type());
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D tensor");
  TORCH_CHECK(t.numel() == 1 || t.numel() == static_cast<int64_t>(n), op, ": ", name,
              " must have 1 element (one LR for all params) or one per param (", n, "), got ",
              t.numel());
  TORCH_CHECK(t.numel() == num_slots, op, ": ", name, " and lrs must have the same length");
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " for ",
              params[0].scalar_type(), " params, got ", t.scalar_type());
  TORCH_CHECK(t.device() == params[0].device(), op, ": ", name, " is on ", t.device(),
              " but params[0] is on ", params[0].device());
}

void check_log_lr_adam(const char* op, const LogLrAdamArgs& adam, const at::Tensor& lrs) {
  if (!adam.state.has_value()) {
    TORCH_CHECK(adam.settings.empty(), op,
                ": hyper_adam must be empty unless hyper_state is given");
    return;
  }
  const at::Tensor& t = *adam.state;
  TORCH_CHECK(adam.settings.size() == 5, op,
              ": hyper_adam must hold [beta1, beta2, eps, lr_min, lr_max], got ",
              adam.settings.size(), " values");
  TORCH_CHECK(t.defined() && t.is_contiguous() && t.numel() == 4 * lrs.numel(), op,
              ": hyper_state must be a contiguous tensor of 4 values per LR slot (",
              4 * lrs.numel(), ")");
  TORCH_CHECK(t.scalar_type() == lrs.scalar_type(), op, ": hyper_state must be ",
              lrs.scalar_type(), " like lrs, got ", t.scalar_type());
  TORCH_CHECK(t.device() == lrs.device(), op, ": hyper_state is on ", t.device(),
              " but lrs is on ", lrs.device());
}

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

void check_fused_dtype(const char* op, const char* what, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              op, ": the fused ", what, " kernels support float32, float64, bfloat16 and float16 "
              "params, got ", dtype);
}

}  // namespace hyperlr
