// The fused SGD-HD ops on CUDA (schemas: csrc/ops.cpp; arguments: csrc/sgd_hd.h; math:
// csrc/sgd_hd_math.h, shared with the CPU kernel, which computes the same bits).
//
// One block per chunk (multi_tensor_apply.cuh); thread l handles elements l, l + kLanes, ... of
// its chunk in order. The reducing passes (sgd_hd_direction_, sgd_hd_lagged_step_) write three partial
// sums per block to a scratch buffer; the last block to finish reduces them per LR slot in block
// order and applies the HD rule on the device. No float atomics, no host sync.
//
// Scratch layout (one byte tensor per call): int64 slot_first_block[S], int64 slot_blocks[S],
// uint32 blocks_done (padded to 8 bytes), acc_t partials[3][total_blocks] (dot, |g^|^2, |d|^2).
// slot_blocks and blocks_done are zeroed before the launch; the block holding chunk 0 of tensor i
// records where slot i (per-tensor slots) starts. A tensor's tag carries its index and flags.
#include "cuda/block_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "ops.h"
#include "sgd_hd.h"
#include "sgd_hd_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace hyperlr {
namespace cuda {
namespace {

constexpr int32_t kHasPrevious = 1;
constexpr int32_t kHasBuffer = 2;
constexpr int kTagShift = 2;

template <typename acc_t>
struct SgdHdParams {
  math::SgdSettings<acc_t> sgd;
  math::HdRuleSettings<acc_t> rule;
  bool has_objective;
  bool has_buffers;
  bool has_directions;
  const float* grad_scale;  // null without AMP
  const float* found_inf;   // null without AMP
  int64_t num_slots;
  acc_t* lrs;
  acc_t* hypergrads;
  acc_t* effective_lrs;
  int64_t* slot_first_block;
  int64_t* slot_blocks;
  unsigned int* blocks_done;
  acc_t* partials;
  int64_t total_blocks;
};

template <typename acc_t>
__device__ int64_t slot_of(const SgdHdParams<acc_t>& p, int32_t tag) {
  return p.num_slots == 1 ? 0 : static_cast<int64_t>(tag >> kTagShift);
}

// A load that bypasses L1: the value was written by another block.
__device__ int64_t load_cg(const int64_t* address) {
  return static_cast<int64_t>(__ldcg(reinterpret_cast<const long long*>(address)));
}

// The last block: per slot, the partials of its blocks in block order (lane i % kLanes, then the
// tree), and the HD rule. Other blocks return.
template <int kDepth, typename acc_t>
__device__ void finish_reduction(const Chunk<kDepth>& chunk, const SgdHdParams<acc_t>& p,
                                 const math::HdSums<acc_t>& block_sums) {
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
      math::hd_rule(p.lrs[slot], p.hypergrads[slot], p.effective_lrs[slot], sums, p.rule);
    }
  }
  if (lane == 0) {
    *p.blocks_done = 0;
  }
}

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
    const acc_t lr = kStep ? math::mul_rn(p.lrs[slot_of(p, chunk.tag)], p.rule.lr_scale) : acc_t(0);
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
    finish_reduction(chunk, p, sums);
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
    const acc_t lr = p.effective_lrs[slot_of(p, chunk.tag)];
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

const float* float_ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

template <typename scalar_t>
void run_cuda(SgdHdMode mode, const SgdHdArgs& a) {
  using acc_t = math::acc_type<scalar_t>;
  const SgdHdTensors t = contiguous_tensors(a);
  const int64_t total_blocks = count_chunks(t.params);
  const int64_t num_slots = a.lrs.numel();
  SgdHdParams<acc_t> p{};
  p.sgd = sgd_settings<acc_t>(a);
  p.rule = rule_settings<acc_t>(a, mode == SgdHdMode::kLagged);
  p.has_objective = !t.objective_grads.empty();
  p.has_buffers = !t.momentum_buffers.empty();
  p.has_directions = !t.prev_directions.empty();
  p.grad_scale = float_ptr_or_null(a.grad_scale);
  p.found_inf = float_ptr_or_null(a.found_inf);
  p.num_slots = num_slots;
  p.effective_lrs = a.effective_lrs.mutable_data_ptr<acc_t>();
  p.total_blocks = total_blocks;
  const std::vector<int32_t> tags = make_tags(a);

  if (mode == SgdHdMode::kParamStep) {
    if (total_blocks > 0) {
      multi_tensor_apply_tagged<2>({at::TensorList(t.params), at::TensorList(t.directions)},
                                   tags, ParamStepFunctor<scalar_t, acc_t>{}, p);
    }
    copy_back(a, t);
    return;
  }
  p.lrs = a.lrs.mutable_data_ptr<acc_t>();
  p.hypergrads = a.hypergrads.mutable_data_ptr<acc_t>();
  if (total_blocks == 0) {
    // Nothing to launch (every tensor is empty): the rule with zero sums leaves eta unchanged,
    // unless AMP says to skip the step (no host sync: the result is selected on the device).
    const at::Tensor old_lrs = a.lrs.clone();
    at::Tensor new_lrs = a.lrs.clamp_min(0);
    at::Tensor new_hypergrads = at::zeros_like(a.hypergrads);
    at::Tensor new_effective = (mode == SgdHdMode::kLagged ? old_lrs : new_lrs).mul(a.lr_scale);
    if (a.found_inf.has_value()) {
      const at::Tensor skip = a.found_inf->reshape({}).ne(0);
      new_lrs = at::where(skip, a.lrs, new_lrs);
      new_hypergrads = at::where(skip, a.hypergrads, new_hypergrads);
      new_effective = at::where(skip, a.effective_lrs, new_effective);
    }
    a.lrs.copy_(new_lrs);
    a.hypergrads.copy_(new_hypergrads);
    a.effective_lrs.copy_(new_effective);
    return;
  }
  const int64_t header_bytes = (2 * num_slots + 1) * static_cast<int64_t>(sizeof(int64_t));
  const int64_t scratch_bytes =
      header_bytes + 3 * total_blocks * static_cast<int64_t>(sizeof(acc_t));
  at::Tensor scratch = at::empty({scratch_bytes}, a.params[0].options().dtype(at::kByte));
  auto* base = static_cast<uint8_t*>(scratch.mutable_data_ptr());
  p.slot_first_block = reinterpret_cast<int64_t*>(base);
  p.slot_blocks = p.slot_first_block + num_slots;
  p.blocks_done = reinterpret_cast<unsigned int*>(p.slot_blocks + num_slots);
  p.partials = reinterpret_cast<acc_t*>(base + header_bytes);
  C10_CUDA_CHECK(cudaMemsetAsync(p.slot_blocks, 0, (num_slots + 1) * sizeof(int64_t),
                                 at::cuda::getCurrentCUDAStream()));
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
  copy_back(a, t);
}

void sgd_hd_cuda(SgdHdMode mode, const SgdHdArgs& a) {
  check_sgd_hd_args(mode, a);
  if (a.params.empty()) {
    return;
  }
  TORCH_CHECK(a.params.size() < (1u << 29), "sgd_hd: too many tensors");
  const c10::cuda::CUDAGuard device_guard(a.params[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.params[0].scalar_type(),
                                  "sgd_hd_cuda", [&] { run_cuda<scalar_t>(mode, a); });
}

}  // namespace
}  // namespace cuda
}  // namespace hyperlr

TORCH_LIBRARY_IMPL(hyperlr_ext, CUDA, m) {
  using hyperlr::SgdHdMode;
  m.impl("sgd_hd_direction_",
         &hyperlr::sgd_hd_reducing_op<&hyperlr::cuda::sgd_hd_cuda, SgdHdMode::kDirection>);
  m.impl("sgd_hd_param_step_", &hyperlr::sgd_hd_param_step_op<&hyperlr::cuda::sgd_hd_cuda>);
  m.impl("sgd_hd_lagged_step_",
         &hyperlr::sgd_hd_reducing_op<&hyperlr::cuda::sgd_hd_cuda, SgdHdMode::kLagged>);
}
