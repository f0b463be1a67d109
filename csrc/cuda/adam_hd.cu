// The fused Adam-HD ops on CUDA (schemas: csrc/schemas.cpp; arguments: csrc/adam_hd.h; math:
// csrc/adam_hd_math.h, shared with the CPU kernel). One block per chunk; thread l handles
// elements l, l + kLanes, ... of its chunk; the reducing passes end with the last-block reduction
// of csrc/cuda/hd_reduce.cuh. A tensor's tag carries its index (for its step count and LR slot)
// and its has_previous flag.
#include "adam_hd.h"
#include "adam_hd_math.h"
#include "cuda/hd_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace hyperlr {
namespace cuda {
namespace {

constexpr int32_t kHasPrevious = 1;

template <typename acc_t>
struct AdamHdParams {
  math::AdamSettings<acc_t> adam;
  bool has_objective;
  const acc_t* steps;       // step count t of this step, per tensor
  const float* grad_scale;  // null without AMP
  const float* found_inf;   // null without AMP
  HdReduction<acc_t> reduction;
};

__device__ inline int64_t tensor_of(int32_t tag) {
  return static_cast<int64_t>(tag >> kTagShift);
}

// lists: 0 param, 1 grad, 2 objective grad (grad if absent), 3 exp_avg, 4 exp_avg_sq,
// 5 max_exp_avg_sq (exp_avg_sq without amsgrad). Pass 1 of exact mode (kStep false) or the
// lagged pass (kStep true).
template <typename scalar_t, typename acc_t, bool kStep>
struct MomentsFunctor {
  __device__ void operator()(const Chunk<6>& chunk, AdamHdParams<acc_t> p) const {
    if (math::skips_step(p.found_inf)) {
      return;
    }
    scalar_t* param = chunk.template data<scalar_t>(0);
    const scalar_t* grad = chunk.template data<const scalar_t>(1);
    const scalar_t* objective_grad = chunk.template data<const scalar_t>(2);
    scalar_t* exp_avg = chunk.template data<scalar_t>(3);
    scalar_t* exp_avg_sq = chunk.template data<scalar_t>(4);
    scalar_t* max_exp_avg_sq = chunk.template data<scalar_t>(5);
    const math::AdamSettings<acc_t>& s = p.adam;
    const HdReduction<acc_t>& r = p.reduction;
    const bool has_previous = (chunk.tag & kHasPrevious) != 0;
    const int64_t slot = slot_of(r, chunk.tag);
    const acc_t step = p.steps[tensor_of(chunk.tag)];
    const math::AdamRatio<acc_t> ratio_constants = math::adam_ratio_constants(step, s);
    const math::AdamRatio<acc_t> previous_ratio =
        math::adam_ratio_constants(math::add_rn(step, acc_t(-1)), s);
    const acc_t inv_grad_scale = static_cast<acc_t>(math::inverse_grad_scale(p.grad_scale));
    // Read before this block counts itself done, so before the last block writes the new values:
    // the LR the previous step applied (AdamW's d_{t-1}) and s_t eta_{t-1} (lagged step).
    const acc_t shrink_inverse = math::previous_shrink_inverse(r.effective_lrs[slot], s);
    const acc_t lr = kStep ? math::mul_rn(r.lrs[slot], r.rule.lr_scale) : acc_t(0);
    const bool reads_param = kStep || s.l2_decay != acc_t(0) || s.adamw_decay != acc_t(0);
    math::HdSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = threadIdx.x; i < chunk.size; i += kBlockThreads) {
      const acc_t w = reads_param ? static_cast<acc_t>(param[i]) : acc_t(0);
      const acc_t g =
          math::adam_grad(math::unscale(static_cast<acc_t>(grad[i]), inv_grad_scale), w, s);
      acc_t objective = g;
      if (p.has_objective) {
        const acc_t og = static_cast<acc_t>(objective_grad[i]);
        objective = math::mul_rn(s.sign, og);
      }
      const acc_t m = static_cast<acc_t>(exp_avg[i]);
      const acc_t v = static_cast<acc_t>(exp_avg_sq[i]);
      const acc_t v_max = s.amsgrad ? static_cast<acc_t>(max_exp_avg_sq[i]) : v;
      const acc_t previous =
          math::adam_previous_direction(m, v_max, w, shrink_inverse, previous_ratio, s);
      math::hd_sums_step(sums, objective, has_previous ? previous : acc_t(0), has_previous);
      const math::AdamMoments<acc_t> next = math::adam_moments(g, m, v, v_max, s);
      exp_avg[i] = static_cast<scalar_t>(next.exp_avg);
      exp_avg_sq[i] = static_cast<scalar_t>(next.exp_avg_sq);
      if (s.amsgrad) {
        max_exp_avg_sq[i] = static_cast<scalar_t>(next.max_exp_avg_sq);
      }
      if (kStep) {
        const acc_t stored_m = static_cast<acc_t>(static_cast<scalar_t>(next.exp_avg));
        const acc_t stored_v = static_cast<acc_t>(static_cast<scalar_t>(next.max_exp_avg_sq));
        const acc_t ratio = math::adam_ratio(stored_m, stored_v, ratio_constants);
        param[i] = static_cast<scalar_t>(math::param_step(w, math::adam_direction(ratio, w, s), lr));
      }
    }
    finish_reduction(chunk, r, sums);
  }
};

// lists: 0 param, 1 exp_avg, 2 the second moment the step uses. Pass 2 of exact mode.
template <typename scalar_t, typename acc_t>
struct ParamStepFunctor {
  __device__ void operator()(const Chunk<3>& chunk, AdamHdParams<acc_t> p) const {
    if (math::skips_step(p.found_inf)) {
      return;
    }
    scalar_t* param = chunk.template data<scalar_t>(0);
    const scalar_t* exp_avg = chunk.template data<const scalar_t>(1);
    const scalar_t* second_moment = chunk.template data<const scalar_t>(2);
    const acc_t lr = p.reduction.effective_lrs[slot_of(p.reduction, chunk.tag)];
    const math::AdamRatio<acc_t> ratio_constants =
        math::adam_ratio_constants(p.steps[tensor_of(chunk.tag)], p.adam);
    for (int64_t i = threadIdx.x; i < chunk.size; i += kBlockThreads) {
      const acc_t w = static_cast<acc_t>(param[i]);
      const acc_t ratio = math::adam_ratio(static_cast<acc_t>(exp_avg[i]),
                                           static_cast<acc_t>(second_moment[i]), ratio_constants);
      param[i] =
          static_cast<scalar_t>(math::param_step(w, math::adam_direction(ratio, w, p.adam), lr));
    }
  }
};

std::vector<int32_t> make_tags(const AdamHdArgs& a) {
  std::vector<int32_t> tags(a.params.size());
  for (size_t i = 0; i < tags.size(); ++i) {
    const bool previous = !a.has_previous.empty() && a.has_previous[i] != 0;
    tags[i] = (static_cast<int32_t>(i) << kTagShift) | (previous ? kHasPrevious : 0);
  }
  return tags;
}

template <typename scalar_t>
void run_cuda(AdamHdMode mode, const AdamHdArgs& a) {
  using acc_t = math::acc_type<scalar_t>;
  const AdamHdTensors t = contiguous_tensors(a);
  AdamHdParams<acc_t> p{};
  p.adam = adam_settings<acc_t>(a);
  p.has_objective = !t.objective_grads.empty();
  p.steps = a.steps.const_data_ptr<acc_t>();
  p.grad_scale = float_ptr_or_null(a.grad_scale);
  p.found_inf = float_ptr_or_null(a.found_inf);
  p.reduction.rule = rule_settings<acc_t>(a, mode == AdamHdMode::kLagged);
  const std::vector<int32_t> tags = make_tags(a);
  const auto launch_param_step = [&] {
    multi_tensor_apply_tagged<3>(
        {at::TensorList(t.params), at::TensorList(t.exp_avgs), at::TensorList(t.exp_avg_sqs)},
        tags, ParamStepFunctor<scalar_t, acc_t>{}, p);
  };
  const auto launch_reducing = [&] {
    // Absent lists are stood in for by others, never read or written (the flags say so).
    const at::TensorList grads(t.grads);
    const std::array<at::TensorList, 6> lists{
        at::TensorList(t.params),
        grads,
        t.objective_grads.empty() ? grads : at::TensorList(t.objective_grads),
        at::TensorList(t.exp_avgs),
        at::TensorList(t.exp_avg_sqs),
        t.max_exp_avg_sqs.empty() ? at::TensorList(t.exp_avg_sqs)
                                  : at::TensorList(t.max_exp_avg_sqs)};
    if (mode == AdamHdMode::kLagged) {
      multi_tensor_apply_tagged<6>(lists, tags, MomentsFunctor<scalar_t, acc_t, true>{}, p);
    } else {
      multi_tensor_apply_tagged<6>(lists, tags, MomentsFunctor<scalar_t, acc_t, false>{}, p);
    }
  };
  run_hd_op<acc_t>(a, mode == AdamHdMode::kParamStep, mode == AdamHdMode::kLagged,
                   count_chunks(t.params), p.reduction, launch_param_step, launch_reducing,
                   [&] { copy_back(a, t); });
}

void adam_hd_cuda(AdamHdMode mode, const AdamHdArgs& a) {
  check_adam_hd_args(mode, a);
  if (a.params.empty()) {
    return;
  }
  TORCH_CHECK(a.params.size() < (1u << 29), "adam_hd: too many tensors");
  const DeviceGuard device_guard(a.params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.params[0].scalar_type(),
                                  "adam_hd_cuda", [&] { run_cuda<scalar_t>(mode, a); });
}

}  // namespace
}  // namespace cuda
}  // namespace hyperlr

HYPERLR_CUDA_LIBRARY_IMPL(m) {
  using hyperlr::AdamHdMode;
  m.impl("adam_hd_moments_",
         &hyperlr::adam_hd_reducing_op<&hyperlr::cuda::adam_hd_cuda, AdamHdMode::kMoments>);
  m.impl("adam_hd_param_step_", &hyperlr::adam_hd_param_step_op<&hyperlr::cuda::adam_hd_cuda>);
  m.impl("adam_hd_lagged_step_",
         &hyperlr::adam_hd_reducing_op<&hyperlr::cuda::adam_hd_cuda, AdamHdMode::kLagged>);
}
