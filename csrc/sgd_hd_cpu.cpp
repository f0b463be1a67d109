// The fused SGD-HD ops on the CPU (schemas in csrc/ops.cpp, math in csrc/sgd_hd_math.h).
// Chunks of kChunkSize elements run in parallel (at::parallel_for); inside a chunk the elements
// are visited in runs of kLanes, lane l taking element l of every run, exactly as CUDA thread l of
// a block does; chunk sums are reduced per LR slot in chunk order (csrc/cpu_chunks.h). Results do
// not depend on the thread count.
#include "cpu_chunks.h"
#include "sgd_hd.h"
#include "sgd_hd_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

namespace hyperlr {
namespace {

using cpu::ChunkList;
using cpu::kChunkSize;
using cpu::kLanes;

// One tensor's data for one chunk; null where the list is absent.
template <typename scalar_t>
struct ChunkData {
  scalar_t* param = nullptr;
  const scalar_t* grad = nullptr;
  const scalar_t* objective = nullptr;  // validation gradient, or null: g^ = g~
  const scalar_t* previous = nullptr;   // d_{t-1} (read before any write to it)
  scalar_t* buffer = nullptr;           // momentum buffer
  scalar_t* prev_direction = nullptr;   // where d_t is kept (momentum 0 / Nesterov)
};

template <typename acc_t>
struct LaneSums {
  std::array<acc_t, kLanes> dot{};
  std::array<acc_t, kLanes> grad_sq{};
  std::array<acc_t, kLanes> dir_sq{};
};

// The inner loops are templates on which lists are present, so that no load or store in them is
// conditional and the compiler can vectorise them; the remaining flags are selects.

// Elements [base, base + width) of the chunk, width <= kLanes, added to lanes 0 .. width - 1.
// The additive rule needs only the dot product (kNorms false): then the norms stay 0.
template <bool kObjective, bool kPrevious, bool kNorms, typename scalar_t, typename acc_t>
void accumulate_run_impl(const ChunkData<scalar_t>& c, int64_t base, int width,
                         const math::SgdSettings<acc_t> s, LaneSums<acc_t>& lanes) {
  // Without weight decay g~ does not depend on w: read the gradient again (it is in cache)
  // instead of a third stream from memory.
  const scalar_t* __restrict__ param = (s.weight_decay != acc_t(0) ? c.param : c.grad) + base;
  const scalar_t* __restrict__ grad = c.grad + base;
  const scalar_t* __restrict__ objective_grad = kObjective ? c.objective + base : nullptr;
  const scalar_t* __restrict__ previous = kPrevious ? c.previous + base : nullptr;
  acc_t* __restrict__ dot = lanes.dot.data();
  acc_t* __restrict__ grad_sq = lanes.grad_sq.data();
  acc_t* __restrict__ dir_sq = lanes.dir_sq.data();
  for (int lane = 0; lane < width; ++lane) {
    acc_t objective;
    if constexpr (kObjective) {
      objective = math::validation_objective(static_cast<acc_t>(objective_grad[lane]), s);
    } else {
      objective = math::decayed_grad(static_cast<acc_t>(grad[lane]),
                                     static_cast<acc_t>(param[lane]), s);
    }
    const acc_t prev = kPrevious ? static_cast<acc_t>(previous[lane]) : acc_t(0);
    if constexpr (kNorms) {
      math::HdSums<acc_t> sums{dot[lane], grad_sq[lane], dir_sq[lane]};
      math::hd_sums_step(sums, objective, prev, kPrevious);
      dot[lane] = sums.dot;
      grad_sq[lane] = sums.grad_sq;
      dir_sq[lane] = sums.dir_sq;
    } else {
      dot[lane] = math::dot_step(dot[lane], objective, prev);
    }
  }
}

template <bool kNorms, typename scalar_t, typename acc_t>
void accumulate_run_lists(const ChunkData<scalar_t>& c, int64_t base, int width,
                          const math::SgdSettings<acc_t>& s, LaneSums<acc_t>& lanes) {
  const bool previous = c.previous != nullptr;
  if (c.objective != nullptr) {
    previous ? accumulate_run_impl<true, true, kNorms>(c, base, width, s, lanes)
             : accumulate_run_impl<true, false, kNorms>(c, base, width, s, lanes);
  } else {
    previous ? accumulate_run_impl<false, true, kNorms>(c, base, width, s, lanes)
             : accumulate_run_impl<false, false, kNorms>(c, base, width, s, lanes);
  }
}

template <typename scalar_t, typename acc_t>
void accumulate_run(const ChunkData<scalar_t>& c, int64_t base, int width, bool norms,
                    const math::SgdSettings<acc_t>& s, LaneSums<acc_t>& lanes) {
  if (norms) {
    accumulate_run_lists<true>(c, base, width, s, lanes);
  } else if (c.previous != nullptr) {  // else nothing to add: the dot product stays 0
    accumulate_run_lists<false>(c, base, width, s, lanes);
  }
}

// torch.optim.SGD's step on elements [base, base + width) with the slot's effective LR.
template <bool kBuffer, bool kDirection, typename scalar_t, typename acc_t>
void update_run_impl(const ChunkData<scalar_t>& c, int64_t base, int64_t width, bool has_buffer,
                     const math::SgdSettings<acc_t> s, acc_t effective_lr) {
  // Settings by value and restrict pointers: nothing a store writes can change them.
  scalar_t* __restrict__ param = c.param + base;
  const scalar_t* __restrict__ grad = c.grad + base;
  scalar_t* __restrict__ buffer = kBuffer ? c.buffer + base : nullptr;
  scalar_t* __restrict__ prev_direction = kDirection ? c.prev_direction + base : nullptr;
  for (int64_t i = 0; i < width; ++i) {
    const acc_t p = static_cast<acc_t>(param[i]);
    const acc_t decayed = math::decayed_grad(static_cast<acc_t>(grad[i]), p, s);
    acc_t new_buffer = acc_t(0);
    if constexpr (kBuffer) {
      new_buffer =
          math::momentum_buffer_step(static_cast<acc_t>(buffer[i]), decayed, has_buffer, s);
      buffer[i] = static_cast<scalar_t>(new_buffer);
    }
    const acc_t direction = math::update_direction(decayed, new_buffer, s);
    if constexpr (kDirection) {
      prev_direction[i] = static_cast<scalar_t>(direction);
    }
    param[i] = static_cast<scalar_t>(math::param_step(p, direction, effective_lr));
  }
}

template <typename scalar_t, typename acc_t>
void update_run(const ChunkData<scalar_t>& c, int64_t base, int64_t width, bool has_buffer,
                const math::SgdSettings<acc_t>& s, acc_t effective_lr) {
  const bool direction = c.prev_direction != nullptr;
  if (c.buffer != nullptr) {
    direction ? update_run_impl<true, true>(c, base, width, has_buffer, s, effective_lr)
              : update_run_impl<true, false>(c, base, width, has_buffer, s, effective_lr);
  } else {
    direction ? update_run_impl<false, true>(c, base, width, has_buffer, s, effective_lr)
              : update_run_impl<false, false>(c, base, width, has_buffer, s, effective_lr);
  }
}

template <typename acc_t>
math::HdSums<acc_t> tree_sums(LaneSums<acc_t>& lanes) {
  return {cpu::tree_reduce(lanes.dot), cpu::tree_reduce(lanes.grad_sq),
          cpu::tree_reduce(lanes.dir_sq)};
}

// Per-slot reduction of the chunk sums (in chunk order) and the HD rule of every slot.
template <typename acc_t>
void finish_slots(const ChunkList& list, const std::vector<math::HdSums<acc_t>>& chunk_sums,
                  const SgdHdArgs& a, const math::HdRuleSettings<acc_t>& rule) {
  const int64_t num_slots = a.lrs.numel();
  std::vector<acc_t> dots(chunk_sums.size()), grad_sqs(chunk_sums.size()),
      dir_sqs(chunk_sums.size());
  for (size_t c = 0; c < chunk_sums.size(); ++c) {
    dots[c] = chunk_sums[c].dot;
    grad_sqs[c] = chunk_sums[c].grad_sq;
    dir_sqs[c] = chunk_sums[c].dir_sq;
  }
  acc_t* lrs = a.lrs.mutable_data_ptr<acc_t>();
  acc_t* hypergrads = a.hypergrads.mutable_data_ptr<acc_t>();
  acc_t* effective_lrs = a.effective_lrs.mutable_data_ptr<acc_t>();
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    const int64_t first = num_slots == 1 ? 0 : list.first_chunk[slot];
    const int64_t count =
        num_slots == 1 ? static_cast<int64_t>(chunk_sums.size()) : list.chunk_count[slot];
    const math::HdSums<acc_t> sums{cpu::reduce_range(dots, first, count),
                                   cpu::reduce_range(grad_sqs, first, count),
                                   cpu::reduce_range(dir_sqs, first, count)};
    math::hd_rule(lrs[slot], hypergrads[slot], effective_lrs[slot], sums, rule);
  }
}

template <typename scalar_t>
ChunkData<scalar_t> chunk_data(const SgdHdTensors& t, const cpu::ChunkRef& chunk,
                               const SgdHdArgs& a) {
  const size_t i = chunk.tensor;
  const int64_t offset = chunk.offset;
  ChunkData<scalar_t> c;
  c.param = t.params[i].mutable_data_ptr<scalar_t>() + offset;
  c.grad = t.grads[i].const_data_ptr<scalar_t>() + offset;
  if (!t.objective_grads.empty()) {
    c.objective = t.objective_grads[i].const_data_ptr<scalar_t>() + offset;
  }
  if (!t.previous.empty() && a.has_previous[i]) {
    c.previous = t.previous[i].const_data_ptr<scalar_t>() + offset;
  }
  if (!t.momentum_buffers.empty()) {
    c.buffer = t.momentum_buffers[i].mutable_data_ptr<scalar_t>() + offset;
  }
  if (!t.prev_directions.empty()) {
    c.prev_direction = t.prev_directions[i].mutable_data_ptr<scalar_t>() + offset;
  }
  return c;
}

// mode: kDot (exact, launch 1), kUpdate (exact, launch 2), kLagged (one pass).
template <typename scalar_t>
void run_cpu(SgdHdMode mode, const SgdHdArgs& a) {
  using acc_t = math::acc_type<scalar_t>;
  const SgdHdTensors t = contiguous_tensors(a);
  const ChunkList list = cpu::make_chunks(t.params);
  const int64_t num_chunks = static_cast<int64_t>(list.chunks.size());
  const math::SgdSettings<acc_t> s = sgd_settings<acc_t>(a);
  const math::HdRuleSettings<acc_t> rule = rule_settings<acc_t>(a, mode == SgdHdMode::kLagged);
  const bool single_slot = a.lrs.numel() == 1;

  // The LR each slot applies: eta_t (exact, written by the dot pass) or s_t eta_{t-1} (lagged).
  std::vector<acc_t> applied(a.lrs.numel());
  if (mode != SgdHdMode::kDot) {
    const at::Tensor& source = mode == SgdHdMode::kUpdate ? a.effective_lrs : a.lrs;
    const acc_t* values = source.const_data_ptr<acc_t>();
    for (size_t k = 0; k < applied.size(); ++k) {
      applied[k] = mode == SgdHdMode::kUpdate ? values[k] : math::mul_rn(values[k], rule.lr_scale);
    }
  }

  std::vector<math::HdSums<acc_t>> chunk_sums(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const cpu::ChunkRef& chunk = list.chunks[k];
      const ChunkData<scalar_t> c = chunk_data<scalar_t>(t, chunk, a);
      const bool has_buffer = !a.has_buffer.empty() && a.has_buffer[chunk.tensor];
      const acc_t lr = mode == SgdHdMode::kDot ? acc_t(0)
                                               : applied[single_slot ? 0 : chunk.tensor];
      if (mode == SgdHdMode::kUpdate) {
        update_run(c, 0, chunk.size, has_buffer, s, lr);
        continue;
      }
      LaneSums<acc_t> lanes;
      for (int64_t base = 0; base < chunk.size; base += kLanes) {
        const int width = static_cast<int>(std::min<int64_t>(kLanes, chunk.size - base));
        accumulate_run(c, base, width, rule.multiplicative, s, lanes);
        if (mode == SgdHdMode::kLagged) {
          update_run(c, base, width, has_buffer, s, lr);  // after the run's d_{t-1} was read
        }
      }
      chunk_sums[k] = tree_sums(lanes);
    }
  });
  if (mode != SgdHdMode::kUpdate) {
    finish_slots(list, chunk_sums, a, rule);
  }
  if (mode != SgdHdMode::kDot) {
    copy_back(a, t);
  }
}

void sgd_hd_cpu(SgdHdMode mode, const SgdHdArgs& a) {
  check_sgd_hd_args(mode, a);
  if (a.params.empty()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "sgd_hd_cpu",
                             [&] { run_cpu<scalar_t>(mode, a); });
}

}  // namespace
}  // namespace hyperlr

TORCH_LIBRARY_IMPL(hyperlr_ext, CPU, m) {
  m.impl("sgd_hd_dot_", &hyperlr::sgd_hd_dot_op<&hyperlr::sgd_hd_cpu>);
  m.impl("sgd_hd_update_", &hyperlr::sgd_hd_update_op<&hyperlr::sgd_hd_cpu>);
  m.impl("sgd_hd_lagged_step_", &hyperlr::sgd_hd_lagged_op<&hyperlr::sgd_hd_cpu>);
}
