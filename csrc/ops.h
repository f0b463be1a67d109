// Declarations shared by the library's registration (ops.cpp, schemas.cpp), multi_tensor_dot's
// checks (multi_tensor_dot.cpp) and the CPU / CUDA kernel files.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace torch {
class Library;
}

namespace hyperlr {

// Defines the schemas of every op of the library (csrc/schemas.cpp) in `m`.
void define_ops(torch::Library& m);

// multi_tensor_dot(a, b) = sum_i <a[i], b[i]>. Throws (naming the argument) unless a and b have
// the same length, a[i].numel() == b[i].numel(), and every tensor is a dense float32 / float64 /
// bfloat16 / float16 tensor of one dtype on one device.
void check_multi_tensor_dot_args(at::TensorList a, at::TensorList b);

// float64 for float64 inputs, float32 for every other supported dtype.
at::ScalarType dot_result_dtype(at::ScalarType input_dtype);

// The tensors made contiguous (no copy for those that already are).
std::vector<at::Tensor> contiguous_list(at::TensorList tensors);

}  // namespace hyperlr
