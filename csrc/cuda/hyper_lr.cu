// The fused HyperLR pass on CUDA (csrc/hyper_lr.h; math: csrc/hyper_lr_math.h, shared with the CPU
// kernel, which computes the same bits). One block per chunk (multi_tensor_apply.cuh); thread l
// handles elements l, l + kLanes, ... of its chunk and rewrites the snapshot in the same pass.
// Each block writes its three partial sums to a scratch buffer; the last block to finish reduces
// them per LR slot in block order into the result (csrc/cuda/hd_reduce.cuh). A tensor's tag
// carries its index and its has_previous flag. No float atomics, no host sync.
#include "cuda/hd_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "fused_args.h"
#include "hyper_lr.h"
#include "hyper_lr_math.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

namespace hyperlr {
namespace cuda {
namespace {

constexpr int32_t kHasPrevious = 1;

template <typename acc_t>
struct HyperLrParams {
  acc_t weight_decay;
  bool maximize;
  const float* grad_scale;  // null without AMP
  const float* found_inf;   // null without AMP
  acc_t* sums;              // the result, [3][num_slots]
  SlotReduction<acc_t> reduction;
};

// lists: 0 param, 1 grad, 2 snapshot.
template <typename scalar_t, typename acc_t>
struct SumsFunctor {
  __device__ void operator()(const Chunk<3>& chunk, HyperLrParams<acc_t> p) const {
    const scalar_t* param = chunk.template data<const scalar_t>(0);
    const scalar_t* grad = chunk.template data<const scalar_t>(1);
    scalar_t* snapshot = chunk.template data<scalar_t>(2);
    const bool has_previous = (chunk.tag & kHasPrevious) != 0;
    const bool keeps_snapshot =
        math::hyper_lr_keeps_snapshot(math::skips_step(p.found_inf), has_previous);
    const math::HyperLrSettings<acc_t> s{
        static_cast<acc_t>(math::inverse_grad_scale(p.grad_scale)), p.weight_decay, p.maximize};
    math::HdSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = threadIdx.x; i < chunk.size; i += kBlockThreads) {
      const scalar_t w = param[i];
      math::hyper_lr_sums_step(sums, static_cast<acc_t>(grad[i]), static_cast<acc_t>(w),
                               static_cast<acc_t>(snapshot[i]), has_previous, s);
      if (!keeps_snapshot) {
        snapshot[i] = w;
      }
    }
    const int64_t num_slots = p.reduction.num_slots;
    acc_t* out = p.sums;
    reduce_slots_in_last_block(chunk, p.reduction, sums,
                               [=](int64_t slot, const math::HdSums<acc_t>& total) {
                                 out[slot] = total.dot;
                                 out[num_slots + slot] = total.grad_sq;
                                 out[2 * num_slots + slot] = total.dir_sq;
                               });
  }
};

std::vector<int32_t> make_tags(at::IntArrayRef has_previous) {
  std::vector<int32_t> tags(has_previous.size());
  for (size_t i = 0; i < tags.size(); ++i) {
    tags[i] = (static_cast<int32_t>(i) << kTagShift) | (has_previous[i] != 0 ? kHasPrevious : 0);
  }
  return tags;
}

at::Tensor hyper_lr_sums_cuda(at::TensorList params, at::TensorList grads,
                              at::TensorList snapshots, at::IntArrayRef has_previous,
                              int64_t num_slots, double weight_decay, bool maximize,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  check_hyper_lr_args(params, grads, snapshots, has_previous, num_slots, grad_scale, found_inf);
  if (params.empty()) {
    return hyper_lr_empty_result(num_slots);
  }
  const DeviceGuard device_guard(params[0].device());
  const std::vector<at::Tensor> p = contiguous_list(params);
  const std::vector<at::Tensor> g = contiguous_list(grads);
  const std::vector<at::Tensor> s = contiguous_list(snapshots);
  const at::TensorOptions options = params[0].options();
  const at::ScalarType acc = dot_result_dtype(params[0].scalar_type());
  const int64_t total_blocks = count_chunks(p);
  if (total_blocks == 0) {
    return at::zeros({3, num_slots}, options.dtype(acc));
  }
  // The last block writes every slot.
  at::Tensor sums = at::empty({3, num_slots}, options.dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(),
                                  "hyper_lr_sums_cuda", [&] {
    using acc_t = math::acc_type<scalar_t>;
    HyperLrParams<acc_t> hp{};
    hp.weight_decay = static_cast<acc_t>(weight_decay);
    hp.maximize = maximize;
    hp.grad_scale = float_ptr_or_null(grad_scale);
    hp.found_inf = float_ptr_or_null(found_inf);
    hp.sums = sums.mutable_data_ptr<acc_t>();
    hp.reduction.num_slots = num_slots;
    hp.reduction.total_blocks = total_blocks;
    const at::Tensor scratch = prepare_reduction(hp.reduction, options);
    multi_tensor_apply_tagged<3>({at::TensorList(p), at::TensorList(g), at::TensorList(s)},
                                 make_tags(has_previous), SumsFunctor<scalar_t, acc_t>{}, hp);
  });
  copy_back_list(snapshots, s);
  return sums;
}

}  // namespace
}  // namespace cuda
}  // namespace hyperlr

HYPERLR_CUDA_LIBRARY_IMPL(m) {
  m.impl("hyper_lr_sums_", &hyperlr::cuda::hyper_lr_sums_cuda);
}
