// The hypergradient reduction shared by the fused CUDA kernels (SGD-HD, Adam-HD, HyperLR): each
// block writes its three partial sums (dot, |g^|^2, |d|^2) to a scratch buffer; the last block to
// finish reduces them per LR slot in block order (lane i % kLanes, then the tree of hd_math.h) and
// applies the HD rule on the device (or hands each slot's sums to the caller). No float atomics,
// no host sync; the CPU kernels (csrc/cpu_hd_reduce.h) reduce in the same order.
//
// Scratch layout (one byte tensor per call): int64 slot_first_block[S], int64 slot_blocks[S],
// uint32 blocks_done (padded to 8 bytes), acc_t partials[3][total_blocks]. slot_blocks and
// blocks_done are zeroed before the launch; the block holding chunk 0 of tensor i records where
// slot i (per-tensor slots) starts. Chunk tags carry the tensor index above kTagShift.
#pragma once

#include "cuda/block_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "fused_args.h"
#include "log_lr_adam_args.h"
#include "sgd_hd_math.h"

#include <ATen/Functions.h>

namespace hyperlr {
namespace cuda {

constexpr int kTagShift = 2;  // the low bits of a tag are per-tensor flags

// The per-slot reduction of the blocks' partial sums: its sizes and its scratch.
template <typename acc_t>
struct SlotReduction {
  int64_t num_slots;
  int64_t* slot_first_block;
  int64_t* slot_blocks;
  unsigned int* blocks_done;
  acc_t* partials;
  int64_t total_blocks;
};

// The reduction of the HD ops: every slot's sums go through the HD rule into its LR.
template <typename acc_t>
struct HdReduction : SlotReduction<acc_t> {
  math::HdRuleSettings<acc_t> rule;
  acc_t* lrs;
  acc_t* hypergrads;
  acc_t* effective_lrs;
  acc_t* adam_state;  // 4 values per slot (the Adam step on log eta), or null
};

template <typename acc_t>
__device__ inline int64_t slot_of(const SlotReduction<acc_t>& r, int32_t tag) {
  return r.num_slots == 1 ? 0 : static_cast<int64_t>(tag >> kTagShift);
}

// A load that bypasses L1: the value was written by another block.
__device__ inline int64_t load_cg(const int64_t* address) {
  return static_cast<int64_t>(__ldcg(reinterpret_cast<const long long*>(address)));
}

// Every block records its sums; the last block then reduces, per slot, the partials of the slot's
// blocks in block order (lane i % kLanes, then the tree) and its thread 0 calls
// `finish_slot(slot, sums)`. Other blocks return.
template <int kDepth, typename acc_t, typename FinishSlot>
__device__ void reduce_slots_in_last_block(const Chunk<kDepth>& chunk,
                                           const SlotReduction<acc_t>& p,
                                           const math::HdSums<acc_t>& block_sums,
                                           const FinishSlot& finish_slot) {
  const int lane = static_cast<int>(threadIdx.x);
  const acc_t dot = block_tree_reduce(block_sums.dot);
  const acc_t grad_sq = block_tree_reduce(block_sums.grad_sq);
  const acc_t dir_sq = block_tree_reduce(block_sums.dir_sq);
  __shared__ bool is_last_block;
  if (lane == 0) {
    p.partials[chunk.block] = dot;
    p.partials[p.total_blocks + chunk.block] = grad_sq;
    p.partials[2 * p.total_blocks + chunk.block] = dir_sq;
    if (chunk.offset == 0 && p.num_slots > 1) {
      const int64_t slot = slot_of(p, chunk.tag);
      const int64_t numel = chunk.meta->numel[chunk.slot];
      p.slot_first_block[slot] = chunk.block;
      p.slot_blocks[slot] = (numel + kChunkSize - 1) / kChunkSize;
    }
    __threadfence();  // the partials are visible before the counter says so
    const unsigned int finished_before = atomicAdd(p.blocks_done, 1u);
    is_last_block = static_cast<int64_t>(finished_before) == p.total_blocks - 1;
  }
  __syncthreads();
  if (!is_last_block) {
    return;
  }
  __threadfence();
  for (int64_t slot = 0; slot < p.num_slots; ++slot) {
    const int64_t first = p.num_slots == 1 ? 0 : load_cg(p.slot_first_block + slot);
    const int64_t count = p.num_slots == 1 ? p.total_blocks : load_cg(p.slot_blocks + slot);
    math::HdSums<acc_t> lane_sums{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = lane; i < count; i += kBlockThreads) {
      lane_sums.dot = math::sum_step(lane_sums.dot, __ldcg(p.partials + first + i));
      lane_sums.grad_sq =
          math::sum_step(lane_sums.grad_sq, __ldcg(p.partials + p.total_blocks + first + i));
      lane_sums.dir_sq =
          math::sum_step(lane_sums.dir_sq, __ldcg(p.partials + 2 * p.total_blocks + first + i));
    }
    const math::HdSums<acc_t> sums{block_tree_reduce(lane_sums.dot),
                                   block_tree_reduce(lane_sums.grad_sq),
                                   block_tree_reduce(lane_sums.dir_sq)};
    if (lane == 0) {
      finish_slot(slot, sums);
    }
  }
  if (lane == 0) {
    *p.blocks_done = 0;
  }
}

// The last block: every slot's sums (reduce_slots_in_last_block) and its HD rule.
template <int kDepth, typename acc_t>
__device__ void finish_reduction(const Chunk<kDepth>& chunk, const HdReduction<acc_t>& p,
                                 const math::HdSums<acc_t>& block_sums) {
  reduce_slots_in_last_block(chunk, p, block_sums,
                             [&p](int64_t slot, const math::HdSums<acc_t>& sums) {
                               math::hd_rule(p.lrs[slot], p.hypergrads[slot],
                                             p.effective_lrs[slot], sums, p.rule,
                                             p.adam_state == nullptr ? nullptr
                                                                     : p.adam_state + 4 * slot);
                             });
}

// Allocates and lays out the scratch buffer of `r` (total_blocks and num_slots set) on the
// current stream; the returned tensor must outlive the launch (the caching allocator keeps it
// valid for the stream).
template <typename acc_t>
at::Tensor prepare_reduction(SlotReduction<acc_t>& r, const at::TensorOptions& options) {
  const int64_t header_bytes = (2 * r.num_slots + 1) * static_cast<int64_t>(sizeof(int64_t));
  const int64_t scratch_bytes =
      header_bytes + 3 * r.total_blocks * static_cast<int64_t>(sizeof(acc_t));
  at::Tensor scratch = at::empty({scratch_bytes}, options.dtype(at::kByte));
  auto* base = static_cast<uint8_t*>(scratch.mutable_data_ptr());
  r.slot_first_block = reinterpret_cast<int64_t*>(base);
  r.slot_blocks = r.slot_first_block + r.num_slots;
  r.blocks_done = reinterpret_cast<unsigned int*>(r.slot_blocks + r.num_slots);
  r.partials = reinterpret_cast<acc_t*>(base + header_bytes);
  memset_async(r.slot_blocks, 0, (r.num_slots + 1) * sizeof(int64_t));
  return scratch;
}

// Every tensor is empty (no block to launch): the rule with zero sums, or nothing when AMP says
// to skip the step (selected on the device, no host sync).
inline void empty_reduction(const at::Tensor& lrs, const at::Tensor& hypergrads,
                            const at::Tensor& effective_lrs, double lr_scale, bool lr_lag,
                            const std::optional<at::Tensor>& found_inf) {
  const at::Tensor old_lrs = lrs.clone();
  at::Tensor new_lrs = lrs.clamp_min(0);
  at::Tensor new_hypergrads = at::zeros_like(hypergrads);
  at::Tensor new_effective = (lr_lag ? old_lrs : new_lrs).mul(lr_scale);
  if (found_inf.has_value()) {
    const at::Tensor skip = found_inf->reshape({}).ne(0);
    new_lrs = at::where(skip, lrs, new_lrs);
    new_hypergrads = at::where(skip, hypergrads, new_hypergrads);
    new_effective = at::where(skip, effective_lrs, new_effective);
  }
  lrs.copy_(new_lrs);
  hypergrads.copy_(new_hypergrads);
  effective_lrs.copy_(new_effective);
}

// The launch sequence every fused HD op shares (SGD-HD, Adam-HD). `a` holds the op's arguments
// (lrs, hypergrads, effective_lrs, lr_scale, found_inf, params and what rule_settings reads);
// `r` is the reduction state inside the functors' parameter block, its rule settings already
// set. The parameter pass
// (`param_step`) launches `launch_param_step` when there is a block to run; a reducing pass
// (the direction/moments pass, or the lagged one-pass step) sets up the scratch of `r` and
// launches `launch_reducing`, or applies the rule to zero sums when every tensor is empty.
// `copy_back` writes results computed in contiguous copies back to the originals.
template <typename acc_t, typename Args, typename LaunchParamStep, typename LaunchReducing,
          typename CopyBack>
void run_hd_op(const Args& a, bool param_step, bool lagged, int64_t total_blocks,
               HdReduction<acc_t>& r, const LaunchParamStep& launch_param_step,
               const LaunchReducing& launch_reducing, const CopyBack& copy_back) {
  r.num_slots = a.lrs.numel();
  r.effective_lrs = a.effective_lrs.template mutable_data_ptr<acc_t>();
  r.total_blocks = total_blocks;
  if (param_step) {
    if (total_blocks > 0) {
      launch_param_step();
    }
    copy_back();
    return;
  }
  if (total_blocks == 0) {
    empty_reduction(a.lrs, a.hypergrads, a.effective_lrs, a.lr_scale, lagged, a.found_inf);
    return;
  }
  r.lrs = a.lrs.template mutable_data_ptr<acc_t>();
  r.hypergrads = a.hypergrads.template mutable_data_ptr<acc_t>();
  r.adam_state = log_lr_adam_state<acc_t>(a.log_lr_adam);
  const at::Tensor scratch = prepare_reduction(r, a.params[0].options());
  launch_reducing();
  copy_back();
}

}  // namespace cuda
}  // namespace hyperlr
