// The fused Adam-HD ops on the CPU (schemas in csrc/schemas.cpp, math in csrc/adam_hd_math.h). Same
// chunk and lane layout as csrc/sgd_hd_cpu.cpp, so the sums reduce in the CUDA kernel's order and
// results do not depend on the thread count.
#include "adam_hd.h"
#include "adam_hd_math.h"
#include "cpu_chunks.h"
#include "cpu_hd_reduce.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace hyperlr {
namespace {

using cpu::ChunkList;
using cpu::kLanes;
using cpu::LaneSums;
using cpu::with_bool;

template <typename scalar_t>
struct ChunkData {
  scalar_t* param = nullptr;
  const scalar_t* grad = nullptr;
  const scalar_t* objective = nullptr;  // validation gradient, or null: g^ = g
  scalar_t* exp_avg = nullptr;
  scalar_t* exp_avg_sq = nullptr;  // the param step: the second moment it uses
  scalar_t* max_exp_avg_sq = nullptr;
  bool has_previous = false;
};

// Per chunk: the settings, and the values of its tensor and LR slot.
template <typename acc_t>
struct PassSettings {
  math::AdamSettings<acc_t> adam;
  acc_t inv_grad_scale;
  math::AdamRatio<acc_t> ratio;           // step t
  math::AdamRatio<acc_t> previous_ratio;  // step t - 1 (for d_{t-1})
  acc_t lr;                               // the LR this pass steps with
  acc_t previous_shrink_inverse;          // AdamW's 1 / (1 - lambda c_{t-1}), else 1
};

// One run of width <= kLanes elements. Its pointers are function parameters: GCC trusts
// __restrict__ there (not on local variables), so the loop vectorises without a runtime alias
// check (which, when it fails, falls back to a scalar loop). The settings come by value: stores
// through the float pointers cannot change them, so their flags stay loop-invariant selects.
template <bool kObjective, bool kNorms, bool kStep, bool kAmsgrad, bool kPrevious,
          typename scalar_t, typename acc_t>
HYPERLR_INLINE void moments_run(scalar_t* __restrict__ param, const scalar_t* __restrict__ weight,
                        const scalar_t* __restrict__ grad,
                        const scalar_t* __restrict__ objective_grad,
                        scalar_t* __restrict__ exp_avg, scalar_t* __restrict__ exp_avg_sq,
                        scalar_t* __restrict__ max_exp_avg_sq, acc_t* __restrict__ dot,
                        acc_t* __restrict__ grad_sq, acc_t* __restrict__ dir_sq, int width,
                        const PassSettings<acc_t> ps, const math::AdamSettings<acc_t> s) {
  for (int lane = 0; lane < width; ++lane) {
    const acc_t w = static_cast<acc_t>(kStep ? param[lane] : weight[lane]);
    const acc_t g =
        math::adam_grad(math::unscale(static_cast<acc_t>(grad[lane]), ps.inv_grad_scale), w, s);
    acc_t objective = g;
    if constexpr (kObjective) {
      const acc_t og = static_cast<acc_t>(objective_grad[lane]);
      objective = math::mul_rn(s.sign, og);
    }
    const acc_t m = static_cast<acc_t>(exp_avg[lane]);
    const acc_t v = static_cast<acc_t>(exp_avg_sq[lane]);
    const acc_t v_max = kAmsgrad ? static_cast<acc_t>(max_exp_avg_sq[lane]) : v;
    acc_t previous = acc_t(0);
    if constexpr (kPrevious) {
      previous = math::adam_previous_direction(m, v_max, w, ps.previous_shrink_inverse,
                                               ps.previous_ratio, s);
    }
    cpu::add_to_lane<kNorms>(dot, grad_sq, dir_sq, lane, objective, previous, kPrevious);
    const math::AdamMoments<acc_t> next = math::adam_moments(g, m, v, v_max, s);
    exp_avg[lane] = static_cast<scalar_t>(next.exp_avg);
    exp_avg_sq[lane] = static_cast<scalar_t>(next.exp_avg_sq);
    if constexpr (kAmsgrad) {
      max_exp_avg_sq[lane] = static_cast<scalar_t>(next.max_exp_avg_sq);
    }
    if constexpr (kStep) {
      // The stored moments, as the exact mode's second pass reads them back.
      const acc_t stored_m = static_cast<acc_t>(static_cast<scalar_t>(next.exp_avg));
      const acc_t stored_v = static_cast<acc_t>(static_cast<scalar_t>(next.max_exp_avg_sq));
      const acc_t ratio = math::adam_ratio(stored_m, stored_v, ps.ratio);
      param[lane] =
          static_cast<scalar_t>(math::param_step(w, math::adam_direction(ratio, w, s), ps.lr));
    }
  }
}

// Pass 1 of exact mode (kStep false) or the lagged pass (kStep true) over one chunk; templates on
// the lists present, so the hot loop has no conditional load or store.
template <bool kObjective, bool kNorms, bool kStep, bool kAmsgrad, bool kPrevious,
          typename scalar_t, typename acc_t>
HYPERLR_INLINE void moments_chunk_body(const ChunkData<scalar_t>& c, int64_t size,
                                       const PassSettings<acc_t> ps, LaneSums<acc_t>& lanes) {
  math::AdamSettings<acc_t> s = ps.adam;
  s.amsgrad = kAmsgrad;  // a constant in this instantiation
  // w is needed for weight decay (L2 or AdamW's d_{t-1}) and for the step; else the gradient
  // stands in (it is in cache).
  const bool decays = s.l2_decay != acc_t(0) || s.adamw_decay != acc_t(0);
  const scalar_t* weight_source = decays ? c.param : c.grad;
  for (int64_t base = 0; base < size; base += kLanes) {
    const int width = static_cast<int>(std::min<int64_t>(kLanes, size - base));
    moments_run<kObjective, kNorms, kStep, kAmsgrad, kPrevious>(
        kStep ? c.param + base : nullptr, kStep ? nullptr : weight_source + base, c.grad + base,
        kObjective ? c.objective + base : nullptr, c.exp_avg + base, c.exp_avg_sq + base,
        kAmsgrad ? c.max_exp_avg_sq + base : nullptr, lanes.dot.data(), lanes.grad_sq.data(),
        lanes.dir_sq.data(), width, ps, s);
  }
}

#if HYPERLR_HAVE_AVX2_VARIANTS
template <bool kObjective, bool kNorms, bool kStep, bool kAmsgrad, bool kPrevious,
          typename scalar_t, typename acc_t>
HYPERLR_TARGET_AVX2 void moments_chunk_avx2(const ChunkData<scalar_t>& c, int64_t size,
                                            const PassSettings<acc_t> ps, LaneSums<acc_t>& lanes) {
  moments_chunk_body<kObjective, kNorms, kStep, kAmsgrad, kPrevious>(c, size, ps, lanes);
}
#endif

template <bool kObjective, bool kNorms, bool kStep, bool kAmsgrad, bool kPrevious,
          typename scalar_t, typename acc_t>
void moments_chunk(const ChunkData<scalar_t>& c, int64_t size, const PassSettings<acc_t> ps,
                   LaneSums<acc_t>& lanes) {
#if HYPERLR_HAVE_AVX2_VARIANTS
  if (cpu::use_avx2()) {
    moments_chunk_avx2<kObjective, kNorms, kStep, kAmsgrad, kPrevious>(c, size, ps, lanes);
    return;
  }
#endif
  moments_chunk_body<kObjective, kNorms, kStep, kAmsgrad, kPrevious>(c, size, ps, lanes);
}

template <bool kStep, typename scalar_t, typename acc_t>
void moments_chunk(bool objective, bool norms, bool amsgrad, const ChunkData<scalar_t>& c,
                   int64_t size, const PassSettings<acc_t>& ps, LaneSums<acc_t>& lanes) {
  with_bool(objective, [&](auto kObjective) {
    with_bool(norms, [&](auto kNorms) {
      with_bool(amsgrad, [&](auto kAmsgrad) {
        with_bool(c.has_previous, [&](auto kPrevious) {
          moments_chunk<decltype(kObjective)::value, decltype(kNorms)::value, kStep,
                        decltype(kAmsgrad)::value, decltype(kPrevious)::value>(c, size, ps,
                                                                               lanes);
        });
      });
    });
  });
}

// Pass 2 of exact mode: w - lr * d_t from the new moments.
template <typename scalar_t, typename acc_t>
HYPERLR_INLINE void param_step_body(const ChunkData<scalar_t>& c, int64_t size,
                                    const PassSettings<acc_t> ps) {
  scalar_t* __restrict__ param = c.param;
  const scalar_t* __restrict__ exp_avg = c.exp_avg;
  const scalar_t* __restrict__ second_moment = c.exp_avg_sq;
  for (int64_t i = 0; i < size; ++i) {
    const acc_t w = static_cast<acc_t>(param[i]);
    const acc_t ratio = math::adam_ratio(static_cast<acc_t>(exp_avg[i]),
                                         static_cast<acc_t>(second_moment[i]), ps.ratio);
    param[i] = static_cast<scalar_t>(
        math::param_step(w, math::adam_direction(ratio, w, ps.adam), ps.lr));
  }
}

#if HYPERLR_HAVE_AVX2_VARIANTS
template <typename scalar_t, typename acc_t>
HYPERLR_TARGET_AVX2 void param_step_avx2(const ChunkData<scalar_t>& c, int64_t size,
                                         const PassSettings<acc_t> ps) {
  param_step_body(c, size, ps);
}
#endif

template <typename scalar_t, typename acc_t>
void param_step_chunk(const ChunkData<scalar_t>& c, int64_t size, const PassSettings<acc_t> ps) {
#if HYPERLR_HAVE_AVX2_VARIANTS
  if (cpu::use_avx2()) {
    param_step_avx2(c, size, ps);
    return;
  }
#endif
  param_step_body(c, size, ps);
}

template <typename scalar_t>
ChunkData<scalar_t> chunk_data(const AdamHdTensors& t, const cpu::ChunkRef& chunk,
                               const AdamHdArgs& a) {
  const size_t i = chunk.tensor;
  ChunkData<scalar_t> c;
  c.param = cpu::chunk_ptr<scalar_t>(t.params, chunk);
  c.grad = cpu::chunk_const_ptr<scalar_t>(t.grads, chunk);
  c.objective = cpu::chunk_const_ptr<scalar_t>(t.objective_grads, chunk);
  c.exp_avg = cpu::chunk_ptr<scalar_t>(t.exp_avgs, chunk);
  c.exp_avg_sq = cpu::chunk_ptr<scalar_t>(t.exp_avg_sqs, chunk);
  c.max_exp_avg_sq = cpu::chunk_ptr<scalar_t>(t.max_exp_avg_sqs, chunk);
  c.has_previous = !a.has_previous.empty() && a.has_previous[i] != 0;
  return c;
}

template <typename scalar_t>
void run_cpu(AdamHdMode mode, const AdamHdArgs& a) {
  using acc_t = math::acc_type<scalar_t>;
  if (math::skips_step(float_ptr_or_null(a.found_inf))) {
    return;
  }
  const AdamHdTensors t = contiguous_tensors(a);
  const ChunkList list = cpu::make_chunks(t.params);
  const int64_t num_chunks = static_cast<int64_t>(list.chunks.size());
  const int64_t num_slots = a.lrs.numel();
  const bool lagged = mode == AdamHdMode::kLagged;
  const math::HdRuleSettings<acc_t> rule = rule_settings<acc_t>(a, lagged);
  const math::AdamSettings<acc_t> adam = adam_settings<acc_t>(a);
  const acc_t* steps = a.steps.const_data_ptr<acc_t>();

  // Per slot, read before the HD rule overwrites them: the LR this pass steps with (eta_t from
  // pass 1, or s_t eta_{t-1} lagged) and the LR the previous step applied.
  std::vector<acc_t> step_lrs(num_slots), previous_lrs(num_slots);
  const acc_t* effective = a.effective_lrs.const_data_ptr<acc_t>();
  for (int64_t k = 0; k < num_slots; ++k) {
    previous_lrs[k] = effective[k];
    step_lrs[k] = lagged ? math::mul_rn(a.lrs.const_data_ptr<acc_t>()[k], rule.lr_scale)
                         : effective[k];
  }
  const acc_t inv_grad_scale =
      static_cast<acc_t>(math::inverse_grad_scale(float_ptr_or_null(a.grad_scale)));
  const auto settings_of = [&](const cpu::ChunkRef& chunk) {
    const int64_t slot = num_slots == 1 ? 0 : static_cast<int64_t>(chunk.tensor);
    const acc_t step = steps[chunk.tensor];
    return PassSettings<acc_t>{adam,
                               inv_grad_scale,
                               math::adam_ratio_constants(step, adam),
                               math::adam_ratio_constants(math::add_rn(step, acc_t(-1)), adam),
                               step_lrs[slot],
                               math::previous_shrink_inverse(previous_lrs[slot], adam)};
  };

  if (mode == AdamHdMode::kParamStep) {
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const cpu::ChunkRef& chunk = list.chunks[k];
        param_step_chunk(chunk_data<scalar_t>(t, chunk, a), chunk.size, settings_of(chunk));
      }
    });
    copy_back(a, t);
    return;
  }

  const bool objective = !t.objective_grads.empty();
  const bool norms = math::reads_norms(rule);
  const auto chunk_pass = [&](const cpu::ChunkRef& chunk, LaneSums<acc_t>& lanes) {
    const ChunkData<scalar_t> c = chunk_data<scalar_t>(t, chunk, a);
    if (lagged) {
      moments_chunk<true>(objective, norms, a.amsgrad, c, chunk.size, settings_of(chunk), lanes);
    } else {
      moments_chunk<false>(objective, norms, a.amsgrad, c, chunk.size, settings_of(chunk), lanes);
    }
  };
  cpu::reduce_chunks(list, chunk_pass, a.lrs, a.hypergrads, a.effective_lrs, rule,
                     log_lr_adam_state<acc_t>(a.log_lr_adam));
  copy_back(a, t);
}

void adam_hd_cpu(AdamHdMode mode, const AdamHdArgs& a) {
  check_adam_hd_args(mode, a);
  if (a.params.empty()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.params[0].scalar_type(),
                                  "adam_hd_cpu", [&] { run_cpu<scalar_t>(mode, a); });
}

}  // namespace
}  // namespace hyperlr

TORCH_LIBRARY_IMPL(hyperlr_ext, CPU, m) {
  using hyperlr::AdamHdMode;
  m.impl("adam_hd_moments_",
         &hyperlr::adam_hd_reducing_op<&hyperlr::adam_hd_cpu, AdamHdMode::kMoments>);
  m.impl("adam_hd_param_step_", &hyperlr::adam_hd_param_step_op<&hyperlr::adam_hd_cpu>);
  m.impl("adam_hd_lagged_step_",
         &hyperlr::adam_hd_reducing_op<&hyperlr::adam_hd_cpu, AdamHdMode::kLagged>);
}
