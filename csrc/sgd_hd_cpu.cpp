// The fused SGD-HD ops on the CPU (schemas in csrc/schemas.cpp, math in csrc/sgd_hd_math.h).
// Chunks of kChunkSize elements run in parallel (at::parallel_for); inside a chunk the elements
// are visited in runs of kLanes, lane l taking element l of every run, exactly as CUDA thread l of
// a block does; chunk sums are reduced per LR slot in chunk order (csrc/cpu_chunks.h). Results do
// not depend on the thread count.
#include "cpu_chunks.h"
#include "cpu_hd_reduce.h"
#include "sgd_hd.h"
#include "sgd_hd_math.h"

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

// Which state a group keeps: plain momentum (the buffer is d), Nesterov (the buffer, and d in
// prev_directions) or no momentum (d in prev_directions).
enum class State { kPlain, kNesterov, kNoMomentum };

// One tensor's data for one chunk; null where the list is absent.
template <typename scalar_t>
struct ChunkData {
  scalar_t* param = nullptr;
  const scalar_t* grad = nullptr;
  const scalar_t* objective = nullptr;  // validation gradient, or null: g^ = g~
  scalar_t* buffer = nullptr;           // momentum buffer
  scalar_t* prev_direction = nullptr;   // d_{t-1}, overwritten with d_t (no momentum / Nesterov)
  const scalar_t* direction = nullptr;  // d_t (sgd_hd_param_step_)
  bool has_buffer = false;
  bool has_previous = false;
};

// Everything one chunk of a reducing pass needs besides its data.
template <typename acc_t>
struct PassSettings {
  math::SgdSettings<acc_t> sgd;
  acc_t inv_grad_scale;
  acc_t lr;  // the LR the lagged pass steps with
};

// Pass 1 of exact mode (kStep false) or the lagged pass (kStep true) over one chunk. The loops are
// templates on which lists exist and on kSteady (the tensor has its buffer and d_{t-1}: every step
// but the first), so that the hot loop has no conditional load or store and vectorises; the
// other flags are selects.
template <State kState, bool kObjective, bool kNorms, bool kStep, bool kSteady, typename scalar_t,
          typename acc_t>
void direction_chunk(const ChunkData<scalar_t>& c, int64_t size, const PassSettings<acc_t> ps,
                     LaneSums<acc_t>& lanes) {
  constexpr bool kBuffer = kState != State::kNoMomentum;
  constexpr bool kKeepsDirection = kState != State::kPlain;
  const math::SgdSettings<acc_t> s = ps.sgd;
  const bool has_previous = kSteady || c.has_previous;
  const math::StepFlags flags{kObjective,      kBuffer, kState == State::kNesterov,
                              kKeepsDirection, kSteady || c.has_buffer, has_previous};
  // w is read for weight decay and for the step; else the gradient stands in (it is in cache).
  const scalar_t* weight_source = s.weight_decay != acc_t(0) ? c.param : c.grad;
  for (int64_t base = 0; base < size; base += kLanes) {
    const int width = static_cast<int>(std::min<int64_t>(kLanes, size - base));
    scalar_t* __restrict__ param = kStep ? c.param + base : nullptr;
    const scalar_t* __restrict__ weight = kStep ? nullptr : weight_source + base;
    const scalar_t* __restrict__ grad = c.grad + base;
    const scalar_t* __restrict__ objective_grad = kObjective ? c.objective + base : nullptr;
    scalar_t* __restrict__ buffer = kBuffer ? c.buffer + base : nullptr;
    scalar_t* __restrict__ prev_direction = kKeepsDirection ? c.prev_direction + base : nullptr;
    acc_t* __restrict__ dot = lanes.dot.data();
    acc_t* __restrict__ grad_sq = lanes.grad_sq.data();
    acc_t* __restrict__ dir_sq = lanes.dir_sq.data();
    for (int lane = 0; lane < width; ++lane) {
      const acc_t w = static_cast<acc_t>(kStep ? param[lane] : weight[lane]);
      const acc_t g = math::unscale(static_cast<acc_t>(grad[lane]), ps.inv_grad_scale);
      const acc_t objective_g = kObjective ? static_cast<acc_t>(objective_grad[lane]) : acc_t(0);
      const acc_t old_buffer = kBuffer ? static_cast<acc_t>(buffer[lane]) : acc_t(0);
      const acc_t old_direction =
          kKeepsDirection ? static_cast<acc_t>(prev_direction[lane]) : acc_t(0);
      const math::DirectionStep<acc_t> e =
          math::direction_step(g, w, objective_g, old_buffer, old_direction, flags, s);
      cpu::add_to_lane<kNorms>(dot, grad_sq, dir_sq, lane, e.objective, e.previous,
                               has_previous);
      if constexpr (kBuffer) {
        buffer[lane] = static_cast<scalar_t>(e.buffer);
      }
      if constexpr (kKeepsDirection) {
        prev_direction[lane] = static_cast<scalar_t>(e.direction);
      }
      if constexpr (kStep) {
        // The stored d_t, as the exact mode's second pass reads it back.
        const acc_t stored = static_cast<acc_t>(static_cast<scalar_t>(e.direction));
        param[lane] = static_cast<scalar_t>(math::param_step(w, stored, ps.lr));
      }
    }
  }
}

template <bool kStep, typename scalar_t, typename acc_t>
void direction_chunk(State state, bool objective, bool norms, const ChunkData<scalar_t>& c,
                     int64_t size, const PassSettings<acc_t>& ps, LaneSums<acc_t>& lanes) {
  const bool steady = c.has_previous && (state == State::kNoMomentum || c.has_buffer);
  with_bool(objective, [&](auto kObjective) {
    with_bool(norms, [&](auto kNorms) {
      with_bool(steady, [&](auto kSteady) {
        constexpr bool o = decltype(kObjective)::value, n = decltype(kNorms)::value,
                       st = decltype(kSteady)::value;
        switch (state) {
          case State::kPlain:
            direction_chunk<State::kPlain, o, n, kStep, st>(c, size, ps, lanes);
            break;
          case State::kNesterov:
            direction_chunk<State::kNesterov, o, n, kStep, st>(c, size, ps, lanes);
            break;
          default:
            direction_chunk<State::kNoMomentum, o, n, kStep, st>(c, size, ps, lanes);
        }
      });
    });
  });
}

// Pass 2 of exact mode: w - lr * d_t.
template <typename scalar_t, typename acc_t>
void param_step_chunk(const ChunkData<scalar_t>& c, int64_t size, acc_t lr) {
  scalar_t* __restrict__ param = c.param;
  const scalar_t* __restrict__ direction = c.direction;
  for (int64_t i = 0; i < size; ++i) {
    param[i] = static_cast<scalar_t>(
        math::param_step(static_cast<acc_t>(param[i]), static_cast<acc_t>(direction[i]), lr));
  }
}

template <typename scalar_t>
ChunkData<scalar_t> chunk_data(const SgdHdTensors& t, const cpu::ChunkRef& chunk,
                               const SgdHdArgs& a) {
  const size_t i = chunk.tensor;
  ChunkData<scalar_t> c;
  c.param = cpu::chunk_ptr<scalar_t>(t.params, chunk);
  c.grad = cpu::chunk_const_ptr<scalar_t>(t.grads, chunk);
  c.objective = cpu::chunk_const_ptr<scalar_t>(t.objective_grads, chunk);
  c.buffer = cpu::chunk_ptr<scalar_t>(t.momentum_buffers, chunk);
  c.prev_direction = cpu::chunk_ptr<scalar_t>(t.prev_directions, chunk);
  c.direction = cpu::chunk_const_ptr<scalar_t>(t.directions, chunk);
  c.has_buffer = !a.has_buffer.empty() && a.has_buffer[i] != 0;
  c.has_previous = !a.has_previous.empty() && a.has_previous[i] != 0;
  return c;
}

template <typename scalar_t>
void run_cpu(SgdHdMode mode, const SgdHdArgs& a) {
  using acc_t = math::acc_type<scalar_t>;
  if (math::skips_step(float_ptr_or_null(a.found_inf))) {
    return;
  }
  const SgdHdTensors t = contiguous_tensors(a);
  const ChunkList list = cpu::make_chunks(t.params);
  const int64_t num_chunks = static_cast<int64_t>(list.chunks.size());
  const bool single_slot = a.lrs.numel() == 1;

  if (mode == SgdHdMode::kParamStep) {
    const acc_t* lrs = a.effective_lrs.const_data_ptr<acc_t>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const cpu::ChunkRef& chunk = list.chunks[k];
        param_step_chunk(chunk_data<scalar_t>(t, chunk, a), chunk.size,
                         lrs[single_slot ? 0 : chunk.tensor]);
      }
    });
    copy_back(a, t);
    return;
  }

  const bool lagged = mode == SgdHdMode::kLagged;
  const math::HdRuleSettings<acc_t> rule = rule_settings<acc_t>(a, lagged);
  const State state = a.momentum == 0.0 ? State::kNoMomentum
                      : a.nesterov      ? State::kNesterov
                                        : State::kPlain;
  PassSettings<acc_t> ps{sgd_settings<acc_t>(a),
                         static_cast<acc_t>(math::inverse_grad_scale(float_ptr_or_null(a.grad_scale))),
                         acc_t(0)};
  // The lagged pass steps with s_t eta_{t-1}: read before finish_slots writes eta_t.
  std::vector<acc_t> applied(a.lrs.numel(), acc_t(0));
  if (lagged) {
    const acc_t* lrs = a.lrs.const_data_ptr<acc_t>();
    for (size_t k = 0; k < applied.size(); ++k) {
      applied[k] = math::mul_rn(lrs[k], rule.lr_scale);
    }
  }
  const bool objective = !t.objective_grads.empty();
  const bool norms = math::reads_norms(rule);
  const auto chunk_pass = [&](const cpu::ChunkRef& chunk, LaneSums<acc_t>& lanes) {
    const ChunkData<scalar_t> c = chunk_data<scalar_t>(t, chunk, a);
    PassSettings<acc_t> chunk_ps = ps;
    chunk_ps.lr = applied[single_slot ? 0 : chunk.tensor];
    if (lagged) {
      direction_chunk<true>(state, objective, norms, c, chunk.size, chunk_ps, lanes);
    } else {
      direction_chunk<false>(state, objective, norms, c, chunk.size, chunk_ps, lanes);
    }
  };
  cpu::reduce_chunks(list, chunk_pass, a.lrs, a.hypergrads, a.effective_lrs, rule,
                     log_lr_adam_state<acc_t>(a.log_lr_adam));
  copy_back(a, t);
}

void sgd_hd_cpu(SgdHdMode mode, const SgdHdArgs& a) {
  check_sgd_hd_args(mode, a);
  if (a.params.empty()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.params[0].scalar_type(),
                                  "sgd_hd_cpu", [&] { run_cpu<scalar_t>(mode, a); });
}

}  // namespace
}  // namespace hyperlr

TORCH_LIBRARY_IMPL(hyperlr_ext, CPU, m) {
  using hyperlr::SgdHdMode;
  m.impl("sgd_hd_direction_",
         &hyperlr::sgd_hd_reducing_op<&hyperlr::sgd_hd_cpu, SgdHdMode::kDirection>);
  m.impl("sgd_hd_param_step_", &hyperlr::sgd_hd_param_step_op<&hyperlr::sgd_hd_cpu>);
  m.impl("sgd_hd_lagged_step_",
         &hyperlr::sgd_hd_reducing_op<&hyperlr::sgd_hd_cpu, SgdHdMode::kLagged>);
}
