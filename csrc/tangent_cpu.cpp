// The fused tangent step on the CPU (csrc/tangent.h): chunks of kChunkSize elements in parallel
// (at::parallel_for), each element through tangent_math.h, the same arithmetic as the CUDA
// functor. Elementwise: the result does not depend on the thread count.
#include "cpu_chunks.h"
#include "tangent.h"
#include "tangent_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace hyperlr {
namespace {

template <typename scalar_t, typename acc_t, TangentInner kInner>
void run_cpu(const TangentArgs& a) {
  const auto t = contiguous_tangent_lists(a);
  const cpu::ChunkList chunks = cpu::make_chunks(t[kParams]);
  const math::SgdSettings<acc_t> sgd = tangent_sgd_settings<acc_t>(a);
  const math::AdamSettings<acc_t> adam = tangent_adam_settings<acc_t>(a);
  const acc_t two_one_minus_beta2 = hyperlr::two_one_minus_beta2<acc_t>(a);
  const acc_t lr = *a.lr.const_data_ptr<acc_t>();
  const acc_t lr_scale = static_cast<acc_t>(a.lr_scale);
  const math::TangentScalars<acc_t> k{*a.mu.const_data_ptr<acc_t>(), math::mul_rn(lr, lr_scale),
                                      lr_scale};
  const math::BiasCorrection<acc_t> bc =
      kInner == TangentInner::kAdam
          ? math::bias_correction(*a.step.const_data_ptr<acc_t>(), adam)
          : math::BiasCorrection<acc_t>{acc_t(1), acc_t(1)};
  const bool has_hvp = !t[kHvps].empty();
  const bool has_state = !t[kState0].empty();
  const bool first_step = a.first_step;

  at::parallel_for(0, static_cast<int64_t>(chunks.chunks.size()), 1,
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const cpu::ChunkRef& chunk = chunks.chunks[c];
      // A pointer into list `list` at this chunk, or null where the list is absent.
      auto ptr = [&](int list) -> scalar_t* {
        return t[list].empty() ? nullptr
                               : t[list][chunk.tensor].template data_ptr<scalar_t>() + chunk.offset;
      };
      scalar_t* param = ptr(kParams);
      const scalar_t* grad = ptr(kGrads);
      const scalar_t* hvp = ptr(kHvps);
      scalar_t* state0 = ptr(kState0);
      scalar_t* state1 = ptr(kState1);
      scalar_t* z_param = ptr(kZParams);
      scalar_t* z_state0 = ptr(kZState0);
      scalar_t* z_state1 = ptr(kZState1);
      scalar_t* direction = ptr(kDirections);
      for (int64_t i = 0; i < chunk.size; ++i) {
        math::TangentIn<acc_t> in{};
        in.param = static_cast<acc_t>(param[i]);
        in.grad = static_cast<acc_t>(grad[i]);
        in.hvp = has_hvp ? static_cast<acc_t>(hvp[i]) : acc_t(0);
        in.z_param = static_cast<acc_t>(z_param[i]);
        if (has_state) {
          in.state0 = static_cast<acc_t>(state0[i]);
          in.z_state0 = static_cast<acc_t>(z_state0[i]);
        }
        math::TangentOut<acc_t> out;
        if constexpr (kInner == TangentInner::kAdam) {
          in.state1 = static_cast<acc_t>(state1[i]);
          in.z_state1 = static_cast<acc_t>(z_state1[i]);
          out = math::adam_tangent_element(in, k, adam, two_one_minus_beta2, bc);
          state1[i] = static_cast<scalar_t>(out.state1);
          z_state1[i] = static_cast<scalar_t>(out.z_state1);
        } else {
          out = math::sgd_tangent_element(in, k, sgd, first_step);
        }
        if (has_state) {
          state0[i] = static_cast<scalar_t>(out.state0);
          z_state0[i] = static_cast<scalar_t>(out.z_state0);
        }
        z_param[i] = static_cast<scalar_t>(out.z_param);
        direction[i] = static_cast<scalar_t>(out.direction);
        param[i] = static_cast<scalar_t>(out.param);
      }
    }
  });
  copy_back_tangent_lists(a, t);
}

void tangent_cpu(const TangentArgs& a) {
  check_tangent_args(a);
  if (a.lists[kParams].empty()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.lists[kParams][0].scalar_type(), "tangent_cpu", [&] {
        using acc_t = math::acc_type<scalar_t>;
        if (a.inner == TangentInner::kAdam) {
          run_cpu<scalar_t, acc_t, TangentInner::kAdam>(a);
        } else {
          run_cpu<scalar_t, acc_t, TangentInner::kSgd>(a);
        }
      });
}

}  // namespace
}  // namespace hyperlr

TORCH_LIBRARY_IMPL(hyperlr_ext, CPU, m) {
  m.impl("tangent_sgd_step_", &hyperlr::tangent_sgd_step_op<&hyperlr::tangent_cpu>);
  m.impl("tangent_adam_step_", &hyperlr::tangent_adam_step_op<&hyperlr::tangent_cpu>);
}
