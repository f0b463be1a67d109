// The fused SGD-HD ops on CUDA (schemas: csrc/schemas.cpp; arguments: csrc/sgd_hd.h; math:
// csrc/sgd_hd_math.h, shared with the CPU kernel, which computes the same bits).
//
// One block per chunk (multi_tensor_apply.cuh); thread l handles elements l, l + kLanes, ... of
// its chunk in order. The reducing passes (sgd_hd_direction_, sgd_hd_lagged_step_) write three partial
// sums per block to a scratch buffer; the last block to finish reduces them per LR slot in block
// order and applies the HD rule on the device. No float atomics, no host sync.
//
// The reduction and its scratch buffer: csrc/cuda/hd_reduce.cuh. A tensor's tag carries its
// index and flags.
#include "cuda/hd_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "ops.h"
#include "sgd_hd.h"
#include "sgd_hd_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

namespace hyperlr {
namespace cuda {
namespace {

constexpr int32_t kHasPrevious = 1;
constexpr int32_t kHasBuffer = 2;

template <typename acc_t>
struct SgdHdParams {
  math::SgdSettings<acc_t> sgd;
  bool has_objective;
  bool has_buffers;
  bool has_directions;
  const float* grad_scale;  // null without AMP
  const float* found_inf;   // null without AMP
  HdReduction<acc_t> reduction;
};

// lists: 0 param, 1 grad, 2 objective grad, 3 momentum buffer, 4 prev_direction (grad where
// absent). Pass 1 of exact mode (kStep false) or the lagged pass (kStep true).
template <typename scalar_t, typename acc_t, bool kStep>
struct DirectionFunctor {
  __device__ void operator()(const Chunk<5>& chunk, SgdHdParams<acc_t> p) const {
    if (math::skips_step(p.found_inf)) {
      return;
    }
    scalar_t* param = chunk.template data<scalar_t>(0);
    const scalar_t* grad = chunk.template data<const scalar_t>(1);
    const scalar_t* objective_grad = chunk.template data<const scalar_t>(2);
    scalar_t* buffer = chunk.template data<scalar_t>(3);
    scalar_t* prev_direction = chunk.template data<scalar_t>(4);
    const bool has_previous = (chunk.tag & kHasPrevious) != 0;
    const math::StepFlags flags{p.has_objective,  p.has_buffers,
                                p.sgd.nesterov,   p.has_directions,
                                (chunk.tag & kHasBuffer) != 0, has_previous};
    const acc_t inv_grad_scale = static_cast<acc_t>(math::inverse_grad_scale(p.grad_scale));
    // Without weight decay or a step, w is not needed: the pass reads one stream less.
    const bool reads_param = kStep || p.sgd.weight_decay != acc_t(0);
    // s_t eta_{t-1}: read before this block counts itself done, so before the last block
    // writes eta_t.
    const HdReduction<acc_t>& r = p.reduction;
    const acc_t lr = kStep ? math::mul_rn(r.lrs[slot_of(r, chunk.tag)], r.rule.lr_scale) : acc_t(0);
    math::HdSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = threadIdx.x; i < chunk.size; i += kBlockThreads) {
      const acc_t w = reads_param ? static_cast<acc_t>(param[i]) : acc_t(0);
      const acc_t g = math::unscale(static_cast<acc_t>(grad[i]), inv_grad_scale);
      const acc_t objective_g = p.has_objective ? static_cast<acc_t>(objective_grad[i]) : acc_t(0);
      const acc_t old_buffer = p.has_buffers ? static_cast<acc_t>(buffer[i]) : acc_t(0);
      const acc_t old_direction =
          p.has_directions ? static_cast<acc_t>(prev_direction[i]) : acc_t(0);
      const math::DirectionStep<acc_t> e =
          math::direction_step(g, w, objective_g, old_buffer, old_direction, flags, p.sgd);
      math::hd_sums_step(sums, e.objective, e.previous, has_previous);
      if (p.has_buffers) {
        buffer[i] = static_cast<scalar_t>(e.buffer);
      }
      if (p.has_directions) {
        prev_direction[i] = static_cast<scalar_t>(e.direction);
      }
      if (kStep) {
        const acc_t stored = static_cast<acc_t>(static_cast<scalar_t>(e.direction));
        param[i] = static_cast<scalar_t>(math::param_step(w, stored, lr));
      }
    }
    finish_reduction(chunk, p.reduction, sums);
  }
};

// lists: 0 param, 1 d_t. Pass 2 of exact mode.
template <typename scalar_t, typename acc_t>
struct ParamStepFunctor {
  __device__ void operator()(const Chunk<2>& chunk, SgdHdParams<acc_t> p) const {
    if (math::skips_step(p.found_inf)) {
      return;
    }
    scalar_t* param = chunk.template data<scalar_t>(0);
    const scalar_t* direction = chunk.template data<const scalar_t>(1);
    const acc_t lr = p.reduction.effective_lrs[slot_of(p.reduction, chunk.tag)];
    for (int64_t i = threadIdx.x; i < chunk.size; i += kBlockThreads) {
      param[i] = static_cast<scalar_t>(math::param_step(static_cast<acc_t>(param[i]),
                                                        static_cast<acc_t>(direction[i]), lr));
    }
  }
};

std::vector<int32_t> make_tags(const SgdHdArgs& a) {
  std::vector<int32_t> tags(a.params.size());
  for (size_t i = 0; i < tags.size(); ++i) {
    int32_t flags = 0;
    if (!a.has_previous.empty() && a.has_previous[i] != 0) {
      flags |= kHasPrevious;
    }
    if (!a.has_buffer.empty() && a.has_buffer[i] != 0) {
      flags |= kHasBuffer;
    }
    tags[i] = (static_cast<int32_t>(i) << kTagShift) | flags;
  }
  return tags;
}

template <typename scalar_t>
void run_cuda(SgdHdMode mode, const SgdHdArgs& a) {
  using acc_t = math::acc_type<scalar_t>;
  const SgdHdTensors t = contiguous_tensors(a);
  SgdHdParams<acc_t> p{};
  p.sgd = sgd_settings<acc_t>(a);
  p.has_objective = !t.objective_grads.empty();
  p.has_buffers = !t.momentum_buffers.empty();
  p.has_directions = !t.prev_directions.empty();
  p.grad_scale = float_ptr_or_null(a.grad_scale);
  p.found_inf = float_ptr_or_null(a.found_inf);
  p.reduction.rule = rule_settings<acc_t>(a, mode == SgdHdMode::kLagged);
  const std::vector<int32_t> tags = make_tags(a);
  const auto launch_param_step = [&] {
    multi_tensor_apply_tagged<2>({at::TensorList(t.params), at::TensorList(t.directions)}, tags,
                                 ParamStepFunctor<scalar_t, acc_t>{}, p);
  };
  const auto launch_reducing = [&] {
    // Absent lists are stood in for by grads, never read or written (the flags above say so).
    const auto or_grads = [&](const std::vector<at::Tensor>& list) -> at::TensorList {
      return list.empty() ? at::TensorList(t.grads) : at::TensorList(list);
    };
    const std::array<at::TensorList, 5> lists{
        at::TensorList(t.params), at::TensorList(t.grads), or_grads(t.objective_grads),
        or_grads(t.momentum_buffers), or_grads(t.prev_directions)};
    if (mode == SgdHdMode::kLagged) {
      multi_tensor_apply_tagged<5>(lists, tags, DirectionFunctor<scalar_t, acc_t, true>{}, p);
    } else {
      multi_tensor_apply_tagged<5>(lists, tags, DirectionFunctor<scalar_t, acc_t, false>{}, p);
    }
  };
  run_hd_op<acc_t>(a, mode == SgdHdMode::kParamStep, mode == SgdHdMode::kLagged,
                   count_chunks(t.params), p.reduction, launch_param_step, launch_reducing,
                   [&] { copy_back(a, t); });
}

void sgd_hd_cuda(SgdHdMode mode, const SgdHdArgs& a) {
  check_sgd_hd_args(mode, a);
  if (a.params.empty()) {
    return;
  }
  TORCH_CHECK(a.params.size() < (1u << 29), "sgd_hd: too many tensors");
  const DeviceGuard device_guard(a.params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.params[0].scalar_type(),
                                  "sgd_hd_cuda", [&] { run_cuda<scalar_t>(mode, a); });
}

}  // namespace
}  // namespace cuda
}  // namespace hyperlr

HYPERLR_CUDA_LIBRARY_IMPL(m) {
  using hyperlr::SgdHdMode;
  m.impl("sgd_hd_direction_",
         &hyperlr::sgd_hd_reducing_op<&hyperlr::cuda::sgd_hd_cuda, SgdHdMode::kDirection>);
  m.impl("sgd_hd_param_step_", &hyperlr::sgd_hd_param_step_op<&hyperlr::cuda::sgd_hd_cuda>);
  m.impl("sgd_hd_lagged_step_",
         &hyperlr::sgd_hd_reducing_op<&hyperlr::cuda::sgd_hd_cuda, SgdHdMode::kLagged>);
}
