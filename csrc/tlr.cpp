// Input checks of the fused TLR window end (csrc/tlr.h).
#include "tlr.h"

#include "fused_args.h"
#include "ops.h"

#include <c10/util/Exception.h>

namespace hyperlr {

void check_tlr_args(at::TensorList params, at::TensorList snapshots, at::TensorList prev_updates,
                    const at::Tensor& lr) {
  constexpr const char* op = "tlr_window_";
  if (params.empty()) {
    return;
  }
  check_fused_dtype(op, "TLR", params[0].scalar_type());
  check_list(op, "params", params, params, false);
  check_list(op, "snapshots", snapshots, params, false);
  check_list(op, "prev_updates", prev_updates, params, false);
  const at::ScalarType acc = dot_result_dtype(params[0].scalar_type());
  TORCH_CHECK(lr.defined() && lr.dim() == 0, op, ": lr must be a 0-dim tensor");
  TORCH_CHECK(lr.scalar_type() == acc && lr.device() == params[0].device(), op, ": lr must be ",
              acc, " on ", params[0].device(), ", got ", lr.scalar_type(), " on ", lr.device());
}

}  // namespace hyperlr
