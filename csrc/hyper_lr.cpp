// Input checks of the fused HyperLR pass (csrc/hyper_lr.h).
#include "hyper_lr.h"

#include "fused_args.h"
#include "ops.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace hyperlr {

void check_hyper_lr_args(at::TensorList params, at::TensorList grads, at::TensorList snapshots,
                         at::IntArrayRef has_previous, int64_t num_slots,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "hyper_lr_sums_";
  const size_t n = params.size();
  TORCH_CHECK(num_slots == 1 || num_slots == static_cast<int64_t>(n), op,
              ": num_slots must be 1 or len(params) = ", n, ", got ", num_slots);
  TORCH_CHECK(grads.size() == n, op, ": grads must have one tensor per param (", n, "), got ",
              grads.size());
  TORCH_CHECK(snapshots.size() == n, op, ": snapshots must have one tensor per param (", n,
              "), got ", snapshots.size());
  check_flags(op, "has_previous", has_previous, n);
  if (n == 0) {
    return;
  }
  TORCH_CHECK(n < (1u << 29), op, ": too many tensors");
  check_fused_dtype(op, "HyperLR", params[0].scalar_type());
  check_list(op, "params", params, params, false);
  check_list(op, "grads", grads, params, false);
  check_list(op, "snapshots", snapshots, params, false);
  check_amp_tensor(op, "grad_scale", grad_scale, params[0]);
  check_amp_tensor(op, "found_inf", found_inf, params[0]);
}

at::Tensor hyper_lr_empty_result(int64_t num_slots) {
  return at::zeros({3, std::max<int64_t>(num_slots, 1)}, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace hyperlr
