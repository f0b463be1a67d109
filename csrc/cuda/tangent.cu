// The fused tangent step on CUDA (csrc/tangent.h): one block per chunk (multi_tensor_apply.cuh),
// each element through tangent_math.h, the arithmetic the CPU kernel runs. lr, mu and the step
// count are read on the device; absent lists are stood in for by grads and never touched.
#include "cuda/hd_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "ops.h"
#include "tangent.h"
#include "tangent_math.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace hyperlr {
namespace cuda {
namespace {

template <typename acc_t>
struct TangentParams {
  math::SgdSettings<acc_t> sgd;
  math::AdamSettings<acc_t> adam;
  acc_t two_one_minus_beta2;
  acc_t lr_scale;
  const acc_t* lr;
  const acc_t* mu;
  const acc_t* step;  // Adam only
  bool has_hvp;
  bool has_state;
  bool has_direction;
  bool first_step;
  const float* found_inf;  // null without AMP
};

template <typename scalar_t, typename acc_t, TangentInner kInner>
struct TangentFunctor {
  __device__ void operator()(const Chunk<kNumTangentLists>& chunk, TangentParams<acc_t> p) const {
    if (math::skips_step(p.found_inf)) {
      return;
    }
    scalar_t* param = chunk.template data<scalar_t>(kParams);
    const scalar_t* grad = chunk.template data<const scalar_t>(kGrads);
    const scalar_t* hvp = chunk.template data<const scalar_t>(kHvps);
    scalar_t* state0 = chunk.template data<scalar_t>(kState0);
    scalar_t* state1 = chunk.template data<scalar_t>(kState1);
    scalar_t* z_param = chunk.template data<scalar_t>(kZParams);
    scalar_t* z_state0 = chunk.template data<scalar_t>(kZState0);
    scalar_t* z_state1 = chunk.template data<scalar_t>(kZState1);
    scalar_t* direction = chunk.template data<scalar_t>(kDirections);
    const math::TangentScalars<acc_t> k{*p.mu, math::mul_rn(*p.lr, p.lr_scale), p.lr_scale};
    math::BiasCorrection<acc_t> bc{acc_t(1), acc_t(1)};
    if (kInner == TangentInner::kAdam) {
      bc = math::bias_correction(*p.step, p.adam);
    }
    for (int64_t i = threadIdx.x; i < chunk.size; i += kBlockThreads) {
      math::TangentIn<acc_t> in{};
      in.param = static_cast<acc_t>(param[i]);
      in.grad = static_cast<acc_t>(grad[i]);
      in.hvp = p.has_hvp ? static_cast<acc_t>(hvp[i]) : acc_t(0);
      in.z_param = static_cast<acc_t>(z_param[i]);
      if (p.has_state) {
        in.state0 = static_cast<acc_t>(state0[i]);
        in.z_state0 = static_cast<acc_t>(z_state0[i]);
      }
      math::TangentOut<acc_t> out;
      if constexpr (kInner == TangentInner::kAdam) {
        in.state1 = static_cast<acc_t>(state1[i]);
        in.z_state1 = static_cast<acc_t>(z_state1[i]);
        out = math::adam_tangent_element(in, k, p.adam, p.two_one_minus_beta2, bc);
        state1[i] = static_cast<scalar_t>(out.state1);
        z_state1[i] = static_cast<scalar_t>(out.z_state1);
      } else {
        out = math::sgd_tangent_element(in, k, p.sgd, p.first_step);
      }
      if (p.has_state) {
        state0[i] = static_cast<scalar_t>(out.state0);
        z_state0[i] = static_cast<scalar_t>(out.z_state0);
      }
      z_param[i] = static_cast<scalar_t>(out.z_param);
      if (p.has_direction) {
        direction[i] = static_cast<scalar_t>(out.direction);
      }
      param[i] = static_cast<scalar_t>(out.param);
    }
  }
};

template <typename scalar_t>
void run_cuda(const TangentArgs& a) {
  using acc_t = math::acc_type<scalar_t>;
  const auto t = contiguous_tangent_lists(a);
  TangentParams<acc_t> p{};
  p.sgd = tangent_sgd_settings<acc_t>(a);
  p.adam = tangent_adam_settings<acc_t>(a);
  p.two_one_minus_beta2 = two_one_minus_beta2<acc_t>(a);
  p.lr_scale = static_cast<acc_t>(a.lr_scale);
  p.lr = a.lr.const_data_ptr<acc_t>();
  p.mu = a.mu.const_data_ptr<acc_t>();
  p.step = a.inner == TangentInner::kAdam ? a.step.const_data_ptr<acc_t>() : nullptr;
  p.has_hvp = !t[kHvps].empty();
  p.has_state = !t[kState0].empty();
  p.has_direction = !t[kDirections].empty();
  p.first_step = a.first_step;
  p.found_inf = float_ptr_or_null(a.found_inf);
  std::array<at::TensorList, kNumTangentLists> lists;
  for (int list = 0; list < kNumTangentLists; ++list) {
    lists[list] = t[list].empty() ? at::TensorList(t[kGrads]) : at::TensorList(t[list]);
  }
  if (a.inner == TangentInner::kAdam) {
    multi_tensor_apply<kNumTangentLists>(lists, TangentFunctor<scalar_t, acc_t, TangentInner::kAdam>{}, p);
  } else {
    multi_tensor_apply<kNumTangentLists>(lists, TangentFunctor<scalar_t, acc_t, TangentInner::kSgd>{}, p);
  }
  copy_back_tangent_lists(a, t);
}

void tangent_cuda(const TangentArgs& a) {
  check_tangent_args(a);
  if (a.lists[kParams].empty()) {
    return;
  }
  const DeviceGuard device_guard(a.lists[kParams][0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.lists[kParams][0].scalar_type(),
                                  "tangent_cuda", [&] { run_cuda<scalar_t>(a); });
}

}  // namespace
}  // namespace cuda
}  // namespace hyperlr

HYPERLR_CUDA_LIBRARY_IMPL(m) {
  m.impl("tangent_sgd_step_", &hyperlr::tangent_sgd_step_op<&hyperlr::cuda::tangent_cuda>);
  m.impl("tangent_adam_step_", &hyperlr::tangent_adam_step_op<&hyperlr::cuda::tangent_cuda>);
}
