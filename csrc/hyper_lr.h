// The fused HyperLR pass (docs/design.md, HyperLR): one pass over a param group's tensors that
// forms, per LR slot, the sums <g^, snapshot - w>, |g^|^2 and |snapshot - w|^2 and writes the new
// snapshot (w). Shared by the CPU kernel (hyper_lr_cpu.cpp) and the CUDA one (cuda/hyper_lr.cu);
// math in hyper_lr_math.h; schema in schemas.cpp; Python side:
// hyperlr_ext/functional/hyper_lr.py.
//
//   hyper_lr_sums_(params, grads, snapshots, has_previous, num_slots, weight_decay, maximize,
//                  grad_scale, found_inf) -> sums
//
// g^ = +-(grad / grad_scale) + weight_decay * w (negated for maximize). num_slots is 1 (every
// tensor adds to slot 0) or len(params) (slot i is tensor i). The result is a new [3, num_slots]
// tensor, float32 (float64 for float64 params) on the params' device: rows <g^, snapshot - w>,
// |g^|^2, |snapshot - w|^2. A tensor with has_previous[i] == 0 adds only to |g^|^2. The
// snapshots are overwritten with the params unless found_inf is nonzero; the sums are formed
// either way. Each chunk of kChunkSize elements is reduced in the lane order of hd_math.h, the
// chunk sums of each slot then in chunk order (the CPU and CUDA kernels agree bit for bit); no
// host sync. Empty params give zeros [3, max(num_slots, 1)] float32 on the CPU.
#pragma once

#include "hyper_lr_math.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace hyperlr {

// Throws, naming the argument, unless the lists are dense tensors like params, has_previous has
// one flag per param, num_slots is 1 or len(params) and grad_scale / found_inf fit.
void check_hyper_lr_args(at::TensorList params, at::TensorList grads, at::TensorList snapshots,
                         at::IntArrayRef has_previous, int64_t num_slots,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf);

// The result of a call without params: zeros [3, max(num_slots, 1)], float32 on the CPU.
at::Tensor hyper_lr_empty_result(int64_t num_slots);

}  // namespace hyperlr
