// The fused TLR window end (docs/design.md, "Kernel byte budgets"): one pass over a param group's
// tensors that forms the window's update u = (w_snapshot - w) / eta, the partial sums of
// <u_prev, u> and |u_prev|^2, and writes the new snapshot (w) and u_prev (u). Shared by the CPU
// kernel (tlr_cpu.cpp) and the CUDA one (cuda/tlr.cu); math in tlr_math.h; schema in ops.cpp;
// Python side: hyperlr_ext/functional/tlr.py.
//
//   tlr_window_(params, snapshots, prev_updates, lr, has_previous) -> sums
//
// lr is the LR the window applied (0-dim, float32; float64 for float64 params, on the params'
// device); the result is a 1-D tensor [<u_prev, u>, |u_prev|^2] in that dtype on that device:
// each chunk of kChunkSize elements is reduced in the lane order of hd_math.h, the chunk partial
// sums then by at::sum (no host sync). With has_previous false the sums are 0.
#pragma once

#include "tlr_math.h"

#include <ATen/core/Tensor.h>

namespace hyperlr {

// Throws, naming the argument, unless the lists are dense tensors like params and lr fits.
void check_tlr_args(at::TensorList params, at::TensorList snapshots, at::TensorList prev_updates,
                    const at::Tensor& lr);

}  // namespace hyperlr
