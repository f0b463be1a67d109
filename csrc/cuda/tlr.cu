// The fused TLR window end on CUDA (csrc/tlr.h): one block per chunk (multi_tensor_apply.cuh);
// thread l handles elements l, l + kLanes, ... of its chunk (tlr_math.h, the CPU kernel's
// arithmetic and lane order), the block's tree gives its partial sums, and at::sum adds the block
// partials. The snapshot and u_prev are rewritten in the same pass. No host sync.
#include "cuda/block_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "fused_args.h"
#include "ops.h"
#include "tlr.h"
#include "tlr_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

namespace hyperlr {
namespace cuda {
namespace {

template <typename acc_t>
struct TlrParams {
  const acc_t* lr;
  bool has_previous;
  acc_t* partials;  // [2][total_blocks]
  int64_t total_blocks;
};

// lists: 0 param, 1 snapshot, 2 prev_update.
template <typename scalar_t, typename acc_t>
struct WindowFunctor {
  __device__ void operator()(const Chunk<3>& chunk, TlrParams<acc_t> p) const {
    const scalar_t* param = chunk.template data<const scalar_t>(0);
    scalar_t* snapshot = chunk.template data<scalar_t>(1);
    scalar_t* prev_update = chunk.template data<scalar_t>(2);
    const acc_t lr = *p.lr;
    math::TlrSums<acc_t> sums{acc_t(0), acc_t(0)};
    for (int64_t i = threadIdx.x; i < chunk.size; i += kBlockThreads) {
      const acc_t w = static_cast<acc_t>(param[i]);
      const acc_t update = math::tlr_update(static_cast<acc_t>(snapshot[i]), w, lr);
      math::tlr_sums_step(sums, static_cast<acc_t>(prev_update[i]), update, p.has_previous);
      snapshot[i] = param[i];
      prev_update[i] = static_cast<scalar_t>(update);
    }
    const acc_t dot = block_tree_reduce(sums.dot);
    const acc_t prev_sq = block_tree_reduce(sums.prev_sq);
    if (threadIdx.x == 0) {
      p.partials[chunk.block] = dot;
      p.partials[p.total_blocks + chunk.block] = prev_sq;
    }
  }
};

at::Tensor tlr_window_cuda(at::TensorList params, at::TensorList snapshots,
                           at::TensorList prev_updates, const at::Tensor& lr, bool has_previous) {
  check_tlr_args(params, snapshots, prev_updates, lr);
  if (params.empty()) {
    return at::zeros({2}, lr.options());
  }
  const DeviceGuard device_guard(params[0].device());
  const std::vector<at::Tensor> p = contiguous_list(params);
  const std::vector<at::Tensor> s = contiguous_list(snapshots);
  const std::vector<at::Tensor> u = contiguous_list(prev_updates);
  const int64_t total_blocks = count_chunks(p);
  at::Tensor partials = at::zeros({2, total_blocks}, lr.options());
  if (total_blocks > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(),
                                    "tlr_window_cuda", [&] {
      using acc_t = math::acc_type<scalar_t>;
      TlrParams<acc_t> tp{lr.const_data_ptr<acc_t>(), has_previous,
                          partials.mutable_data_ptr<acc_t>(), total_blocks};
      multi_tensor_apply<3>({at::TensorList(p), at::TensorList(s), at::TensorList(u)},
                            WindowFunctor<scalar_t, acc_t>{}, tp);
    });
  }
  copy_back_list(snapshots, s);
  copy_back_list(prev_updates, u);
  return partials.sum(1);
}

}  // namespace
}  // namespace cuda
}  // namespace hyperlr

HYPERLR_CUDA_LIBRARY_IMPL(m) {
  m.impl("tlr_window_", &hyperlr::cuda::tlr_window_cuda);
}
