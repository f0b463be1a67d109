// Input checks and contiguity handling of the fused tangent step (csrc/tangent.h).
#include "tangent.h"

#include "fused_args.h"
#include "ops.h"

#include <c10/util/Exception.h>

namespace hyperlr {
namespace {

constexpr const char* kListNames[kNumTangentLists] = {
    "params", "grads", "hvps", "state0", "state1", "z_params", "z_state0", "z_state1",
    "directions"};

const char* list_name(TangentInner inner, int list) {
  if (inner == TangentInner::kAdam) {
    constexpr const char* kAdam[kNumTangentLists] = {
        "params",   "grads",      "hvps",          "exp_avgs",  "exp_avg_sqs",
        "z_params", "z_exp_avgs", "z_exp_avg_sqs", "directions"};
    return kAdam[list];
  }
  if (list == kState0) {
    return "momentum_buffers";
  }
  if (list == kZState0) {
    return "z_buffers";
  }
  return kListNames[list];
}

// A 0-dim tensor in the accumulation dtype on the params' device.
void check_scalar(const char* op, const char* name, const at::Tensor& t, const at::Tensor& param) {
  const at::ScalarType acc = dot_result_dtype(param.scalar_type());
  TORCH_CHECK(t.defined() && t.dim() == 0, op, ": ", name, " must be a 0-dim tensor");
  TORCH_CHECK(t.scalar_type() == acc && t.device() == param.device(), op, ": ", name,
              " must be ", acc, " on ", param.device(), ", got ", t.scalar_type(), " on ",
              t.device());
}

}  // namespace

void check_tangent_args(const TangentArgs& a) {
  const bool adam = a.inner == TangentInner::kAdam;
  const char* op = adam ? "tangent_adam_step_" : "tangent_sgd_step_";
  const at::TensorList params = a.lists[kParams];
  if (params.empty()) {
    return;
  }
  check_fused_dtype(op, "tangent", params[0].scalar_type());
  const bool has_buffers = adam || a.momentum != 0.0;
  for (int list = 0; list < kNumTangentLists; ++list) {
    const bool optional = list == kHvps || list == kDirections || (!adam && (list == kState1 || list == kZState1)) ||
                          (!has_buffers && (list == kState0 || list == kZState0));
    check_list(op, list_name(a.inner, list), a.lists[list], params, optional);
  }
  if (!adam) {
    TORCH_CHECK(a.lists[kState0].empty() != has_buffers &&
                    a.lists[kZState0].empty() != has_buffers,
                op, ": momentum_buffers and z_buffers must be given exactly when momentum != 0");
    TORCH_CHECK(a.lists[kState1].empty() && a.lists[kZState1].empty(), op,
                ": SGD has no second state list");
  }
  check_scalar(op, "lr", a.lr, params[0]);
  check_scalar(op, "mu", a.mu, params[0]);
  if (adam) {
    check_scalar(op, "step", a.step, params[0]);
  }
  check_amp_tensor(op, "found_inf", a.found_inf, params[0]);
}

std::array<std::vector<at::Tensor>, kNumTangentLists> contiguous_tangent_lists(
    const TangentArgs& a) {
  std::array<std::vector<at::Tensor>, kNumTangentLists> t;
  for (int list = 0; list < kNumTangentLists; ++list) {
    t[list] = contiguous_or_empty(a.lists[list]);
  }
  return t;
}

void copy_back_tangent_lists(const TangentArgs& a,
                             const std::array<std::vector<at::Tensor>, kNumTangentLists>& t) {
  for (int list : {kParams, kState0, kState1, kZParams, kZState0, kZState1, kDirections}) {
    copy_back_list(a.lists[list], t[list]);
  }
}

}  // namespace hyperlr
