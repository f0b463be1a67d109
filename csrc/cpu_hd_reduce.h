// The hypergradient reduction of the fused CPU kernels (SGD-HD, Adam-HD, HyperLR): per-chunk lane
// sums of <g^, d_{t-1}>, |g^|^2, |d_{t-1}|^2 laid out as the CUDA lanes (csrc/hd_math.h), their
// per-slot reduction in chunk order, and the HD rule of every LR slot (csrc/sgd_hd_math.h).
#pragma once

#include "cpu_chunks.h"
#include "fused_args.h"
#include "sgd_hd_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <type_traits>
#include <vector>

// x86-64 builds with GCC or Clang also compile the CPU element loops for AVX2 (function
// attributes, chosen at run time by use_avx2()): twice the vector width of the x86-64 baseline,
// which the division- and sqrt-heavy Adam loops need.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define HYPERLR_HAVE_AVX2_VARIANTS 1
#define HYPERLR_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define HYPERLR_HAVE_AVX2_VARIANTS 0
#endif

namespace hyperlr {
namespace cpu {

template <typename acc_t>
struct LaneSums {
  std::array<acc_t, kLanes> dot{};
  std::array<acc_t, kLanes> grad_sq{};
  std::array<acc_t, kLanes> dir_sq{};
};

// Adds one element to lane `lane`. The additive rule needs only the dot product (kNorms false:
// the norms stay 0). A tensor without d_{t-1} adds nothing to the dot product and |d|^2.
template <bool kNorms, typename acc_t>
HYPERLR_INLINE void add_to_lane(acc_t* __restrict__ dot, acc_t* __restrict__ grad_sq,
                        acc_t* __restrict__ dir_sq, int lane, acc_t objective, acc_t previous,
                        bool has_previous) {
  if constexpr (kNorms) {
    math::HdSums<acc_t> sums{dot[lane], grad_sq[lane], dir_sq[lane]};
    math::hd_sums_step(sums, objective, previous, has_previous);
    dot[lane] = sums.dot;
    grad_sq[lane] = sums.grad_sq;
    dir_sq[lane] = sums.dir_sq;
  } else {
    const acc_t new_dot = math::dot_step(dot[lane], objective, previous);
    dot[lane] = has_previous ? new_dot : dot[lane];
  }
}

template <typename acc_t>
math::HdSums<acc_t> tree_sums(LaneSums<acc_t>& lanes) {
  return {tree_reduce(lanes.dot), tree_reduce(lanes.grad_sq), tree_reduce(lanes.dir_sq)};
}

// Every slot's sums from the chunk sums, in chunk order: `finish_slot(slot, sums)` for each of
// the num_slots slots (1: every chunk; else slot i is tensor i's chunks).
template <typename acc_t, typename FinishSlot>
void reduce_slots(const ChunkList& list, const std::vector<math::HdSums<acc_t>>& chunk_sums,
                  int64_t num_slots, const FinishSlot& finish_slot) {
  std::vector<acc_t> dots(chunk_sums.size()), grad_sqs(chunk_sums.size()),
      dir_sqs(chunk_sums.size());
  for (size_t c = 0; c < chunk_sums.size(); ++c) {
    dots[c] = chunk_sums[c].dot;
    grad_sqs[c] = chunk_sums[c].grad_sq;
    dir_sqs[c] = chunk_sums[c].dir_sq;
  }
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    const int64_t first = num_slots == 1 ? 0 : list.first_chunk[slot];
    const int64_t count =
        num_slots == 1 ? static_cast<int64_t>(chunk_sums.size()) : list.chunk_count[slot];
    finish_slot(slot, math::HdSums<acc_t>{reduce_range(dots, first, count),
                                          reduce_range(grad_sqs, first, count),
                                          reduce_range(dir_sqs, first, count)});
  }
}

// Per-slot reduction of the chunk sums (in chunk order) and the HD rule of every slot; the slot
// tensors are 1-D of length 1 (every chunk) or one per tensor; `adam_state` (4 values per slot)
// is null unless the rule is the Adam step on log eta.
template <typename acc_t>
void finish_slots(const ChunkList& list, const std::vector<math::HdSums<acc_t>>& chunk_sums,
                  const at::Tensor& lrs, const at::Tensor& hypergrads,
                  const at::Tensor& effective_lrs, const math::HdRuleSettings<acc_t>& rule,
                  acc_t* adam_state) {
  acc_t* lr = lrs.mutable_data_ptr<acc_t>();
  acc_t* hypergrad = hypergrads.mutable_data_ptr<acc_t>();
  acc_t* effective_lr = effective_lrs.mutable_data_ptr<acc_t>();
  reduce_slots(list, chunk_sums, lrs.numel(),
               [&](int64_t slot, const math::HdSums<acc_t>& sums) {
                 math::hd_rule(lr[slot], hypergrad[slot], effective_lr[slot], sums, rule,
                               adam_state == nullptr ? nullptr : adam_state + 4 * slot);
               });
}

// The chunk sums of a reducing pass: `chunk_pass(chunk, lanes)` runs one chunk's element loop
// into that chunk's lane sums (chunks in parallel on torch's threads), then each chunk's lane
// tree.
template <typename acc_t, typename ChunkPass>
std::vector<math::HdSums<acc_t>> chunk_sums(const ChunkList& list, const ChunkPass& chunk_pass) {
  const int64_t num_chunks = static_cast<int64_t>(list.chunks.size());
  std::vector<math::HdSums<acc_t>> sums(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      LaneSums<acc_t> lanes;
      chunk_pass(list.chunks[k], lanes);
      sums[k] = tree_sums(lanes);
    }
  });
  return sums;
}

// The reducing pass of a fused HD op: the chunk sums (chunk_sums), every slot's sums in chunk
// order and the HD rule (finish_slots).
template <typename acc_t, typename ChunkPass>
void reduce_chunks(const ChunkList& list, const ChunkPass& chunk_pass, const at::Tensor& lrs,
                   const at::Tensor& hypergrads, const at::Tensor& effective_lrs,
                   const math::HdRuleSettings<acc_t>& rule, acc_t* adam_state) {
  finish_slots(list, chunk_sums<acc_t>(list, chunk_pass), lrs, hypergrads, effective_lrs, rule,
               adam_state);
}

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template argument.
template <typename F>
void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Whether the CPU kernels may use their AVX2 variants: the CPU has AVX2 and the variants were not
// switched off (hyperlr_ext._C.set_cpu_avx2(False), for tests). The variants compute the same
// bits: the same IEEE operations, no FMA (-ffp-contract=off), only wider vectors.
bool use_avx2();

// Allows or forbids the AVX2 variants; returns whether they were in use before.
bool set_avx2_allowed(bool allowed);

}  // namespace cpu
}  // namespace hyperlr
