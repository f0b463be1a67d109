// The fused tangent step on the CPU (csrc/tangent.h): chunks of kChunkSize elements in parallel
// (at::parallel_for), each element through tangent_math.h, the same arithmetic as the CUDA
// functor. Elementwise: the result does not depend on the thread count.
//
// The element loops are templates on which lists exist and on the SGD flags (first step,
// Nesterov), with restrict-qualified pointers, so that the loop body has no branch and GCC
// vectorises it; x86-64 builds also compile an AVX2 variant (cpu_hd_reduce.h), chosen at run time.
#include "cpu_chunks.h"
#include "cpu_hd_reduce.h"
#include "tangent.h"
#include "tangent_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace hyperlr {
namespace {

using cpu::with_bool;

// What one chunk's loop needs besides its pointers.
template <typename acc_t>
struct LoopSettings {
  math::TangentScalars<acc_t> k;
  math::SgdSettings<acc_t> sgd;
  math::AdamSettings<acc_t> adam;
  acc_t two_one_minus_beta2;
  math::BiasCorrection<acc_t> bc;
};

// kHvp: H Z_w is given; kState: SGD's momentum buffer (always true for Adam); kDirection: d_t is
// kept; kFirst / kNesterov: SGD only.
template <TangentInner kInner, bool kHvp, bool kState, bool kDirection, bool kFirst,
          bool kNesterov, typename scalar_t, typename acc_t>
HYPERLR_INLINE void tangent_loop(int64_t n, scalar_t* __restrict__ param,
                                 const scalar_t* __restrict__ grad,
                                 const scalar_t* __restrict__ hvp, scalar_t* __restrict__ state0,
                                 scalar_t* __restrict__ state1, scalar_t* __restrict__ z_param,
                                 scalar_t* __restrict__ z_state0, scalar_t* __restrict__ z_state1,
                                 scalar_t* __restrict__ direction, const LoopSettings<acc_t> ls) {
  math::SgdSettings<acc_t> sgd = ls.sgd;
  sgd.has_momentum = kState;
  sgd.nesterov = kNesterov;
  for (int64_t i = 0; i < n; ++i) {
    math::TangentIn<acc_t> in{};
    in.param = static_cast<acc_t>(param[i]);
    in.grad = static_cast<acc_t>(grad[i]);
    in.hvp = kHvp ? static_cast<acc_t>(hvp[i]) : acc_t(0);
    in.z_param = static_cast<acc_t>(z_param[i]);
    if constexpr (kState) {
      in.state0 = static_cast<acc_t>(state0[i]);
      in.z_state0 = static_cast<acc_t>(z_state0[i]);
    }
    math::TangentOut<acc_t> out;
    if constexpr (kInner == TangentInner::kAdam) {
      in.state1 = static_cast<acc_t>(state1[i]);
      in.z_state1 = static_cast<acc_t>(z_state1[i]);
      out = math::adam_tangent_element(in, ls.k, ls.adam, ls.two_one_minus_beta2, ls.bc);
      state1[i] = static_cast<scalar_t>(out.state1);
      z_state1[i] = static_cast<scalar_t>(out.z_state1);
    } else {
      out = math::sgd_tangent_element(in, ls.k, sgd, kFirst);
    }
    if constexpr (kState) {
      state0[i] = static_cast<scalar_t>(out.state0);
      z_state0[i] = static_cast<scalar_t>(out.z_state0);
    }
    z_param[i] = static_cast<scalar_t>(out.z_param);
    if constexpr (kDirection) {
      direction[i] = static_cast<scalar_t>(out.direction);
    }
    param[i] = static_cast<scalar_t>(out.param);
  }
}

template <TangentInner kInner, bool kHvp, bool kState, bool kDirection, bool kFirst,
          bool kNesterov, typename scalar_t, typename acc_t>
void tangent_loop_baseline(int64_t n, scalar_t* param, const scalar_t* grad, const scalar_t* hvp,
                           scalar_t* state0, scalar_t* state1, scalar_t* z_param,
                           scalar_t* z_state0, scalar_t* z_state1, scalar_t* direction,
                           const LoopSettings<acc_t> ls) {
  tangent_loop<kInner, kHvp, kState, kDirection, kFirst, kNesterov>(
      n, param, grad, hvp, state0, state1, z_param, z_state0, z_state1, direction, ls);
}

#if HYPERLR_HAVE_AVX2_VARIANTS
template <TangentInner kInner, bool kHvp, bool kState, bool kDirection, bool kFirst,
          bool kNesterov, typename scalar_t, typename acc_t>
HYPERLR_TARGET_AVX2 void tangent_loop_avx2(int64_t n, scalar_t* param, const scalar_t* grad,
                                           const scalar_t* hvp, scalar_t* state0,
                                           scalar_t* state1, scalar_t* z_param,
                                           scalar_t* z_state0, scalar_t* z_state1,
                                           scalar_t* direction, const LoopSettings<acc_t> ls) {
  tangent_loop<kInner, kHvp, kState, kDirection, kFirst, kNesterov>(
      n, param, grad, hvp, state0, state1, z_param, z_state0, z_state1, direction, ls);
}
#endif

template <TangentInner kInner, bool kHvp, bool kState, bool kDirection, bool kFirst,
          bool kNesterov, typename scalar_t, typename acc_t>
void run_chunks(const std::array<std::vector<at::Tensor>, kNumTangentLists>& t,
                const cpu::ChunkList& chunks, const LoopSettings<acc_t>& ls) {
  const bool avx2 = cpu::use_avx2();
  at::parallel_for(0, static_cast<int64_t>(chunks.chunks.size()), 1,
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const cpu::ChunkRef& chunk = chunks.chunks[c];
      // A pointer into list `list` at this chunk, or null where the list is absent.
      auto ptr = [&](int list) -> scalar_t* {
        return t[list].empty() ? nullptr
                               : t[list][chunk.tensor].template data_ptr<scalar_t>() + chunk.offset;
      };
      auto loop = tangent_loop_baseline<kInner, kHvp, kState, kDirection, kFirst, kNesterov,
                                        scalar_t, acc_t>;
#if HYPERLR_HAVE_AVX2_VARIANTS
      if (avx2) {
        loop = tangent_loop_avx2<kInner, kHvp, kState, kDirection, kFirst, kNesterov, scalar_t,
                                 acc_t>;
      }
#endif
      loop(chunk.size, ptr(kParams), ptr(kGrads), ptr(kHvps), ptr(kState0), ptr(kState1),
           ptr(kZParams), ptr(kZState0), ptr(kZState1), ptr(kDirections), ls);
    }
  });
  (void)avx2;
}

template <typename scalar_t>
void run_cpu(const TangentArgs& a) {
  using acc_t = math::acc_type<scalar_t>;
  const auto t = contiguous_tangent_lists(a);
  const cpu::ChunkList chunks = cpu::make_chunks(t[kParams]);
  LoopSettings<acc_t> ls{};
  ls.sgd = tangent_sgd_settings<acc_t>(a);
  ls.adam = tangent_adam_settings<acc_t>(a);
  ls.two_one_minus_beta2 = two_one_minus_beta2<acc_t>(a);
  const acc_t lr = *a.lr.const_data_ptr<acc_t>();
  const acc_t lr_scale = static_cast<acc_t>(a.lr_scale);
  ls.k = {*a.mu.const_data_ptr<acc_t>(), math::mul_rn(lr, lr_scale), lr_scale};
  ls.bc = a.inner == TangentInner::kAdam
              ? math::bias_correction(*a.step.const_data_ptr<acc_t>(), ls.adam)
              : math::BiasCorrection<acc_t>{acc_t(1), acc_t(1)};
  const bool has_hvp = !t[kHvps].empty();
  const bool has_direction = !t[kDirections].empty();
  with_bool(has_hvp, [&](auto hvp_flag) {
    with_bool(has_direction, [&](auto keep_flag) {
      constexpr bool kHvp = decltype(hvp_flag)::value, kKeep = decltype(keep_flag)::value;
      if (a.inner == TangentInner::kAdam) {
        run_chunks<TangentInner::kAdam, kHvp, true, kKeep, false, false, scalar_t>(t, chunks, ls);
      } else if (t[kState0].empty()) {
        run_chunks<TangentInner::kSgd, kHvp, false, kKeep, false, false, scalar_t>(t, chunks, ls);
      } else {
        with_bool(a.first_step, [&](auto first_flag) {
          with_bool(a.nesterov, [&](auto nesterov_flag) {
            run_chunks<TangentInner::kSgd, kHvp, true, kKeep, decltype(first_flag)::value,
                       decltype(nesterov_flag)::value, scalar_t>(t, chunks, ls);
          });
        });
      }
    });
  });
  copy_back_tangent_lists(a, t);
}

void tangent_cpu(const TangentArgs& a) {
  check_tangent_args(a);
  if (a.lists[kParams].empty() || math::skips_step(float_ptr_or_null(a.found_inf))) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.lists[kParams][0].scalar_type(),
                                  "tangent_cpu", [&] { run_cpu<scalar_t>(a); });
}

}  // namespace
}  // namespace hyperlr

TORCH_LIBRARY_IMPL(hyperlr_ext, CPU, m) {
  m.impl("tangent_sgd_step_", &hyperlr::tangent_sgd_step_op<&hyperlr::tangent_cpu>);
  m.impl("tangent_adam_step_", &hyperlr::tangent_adam_step_op<&hyperlr::tangent_cpu>);
}
