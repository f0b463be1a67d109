// Argument checks and contiguity helpers shared by the fused ops (csrc/sgd_hd.cpp,
// csrc/adam_hd.cpp): every message names the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace hyperlr {

// Every tensor of `list` is a dense tensor like params[i] (dtype, device, numel); an empty list
// passes when may_be_empty.
void check_list(const char* op, const char* name, at::TensorList list, at::TensorList params,
                bool may_be_empty);

// One int flag per param.
void check_flags(const char* op, const char* name, at::IntArrayRef flags, size_t n);

// An LR slot tensor: contiguous 1-D, 1 or len(params) elements (= num_slots), float32 (float64
// for float64 params), on the params' device.
void check_slot_tensor(const char* op, const char* name, const at::Tensor& t,
                       at::TensorList params, int64_t num_slots);

// grad_scale / found_inf: absent, or one float32 element on the params' device.
void check_amp_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                      const at::Tensor& param);

// The four floating dtypes the fused kernels take.
void check_fused_dtype(const char* op, const char* what, at::ScalarType dtype);

std::vector<at::Tensor> contiguous_or_empty(at::TensorList list);

// Copies results computed in contiguous copies back into non-contiguous originals.
void copy_back_list(at::TensorList originals, const std::vector<at::Tensor>& results);

// The data of an optional float32 tensor (AMP's grad_scale / found_inf), or null; shared by the
// CPU kernels and the CUDA launchers.
inline const float* float_ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

}  // namespace hyperlr
