// Input checks and helpers of multi_tensor_dot (csrc/ops.h), shared by its CPU and CUDA kernels.
#include "ops.h"

#include <c10/util/Exception.h>

#include <string>

namespace hyperlr {

namespace {

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
         dtype == at::kHalf;
}

std::string arg_name(const char* list, size_t index) {
  return std::string(list) + "[" + std::to_string(index) + "]";
}

}  // namespace

void check_multi_tensor_dot_args(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(),
              "multi_tensor_dot: a and b must have the same length, but a has ", a.size(),
              " tensors and b has ", b.size());
  if (a.empty()) {
    return;
  }
  const at::Tensor& first = a[0];
  for (size_t i = 0; i < a.size(); ++i) {
    for (const char* list : {"a", "b"}) {
      const at::Tensor& t = (list[0] == 'a') ? a[i] : b[i];
      TORCH_CHECK(t.defined(), "multi_tensor_dot: ", arg_name(list, i), " is an undefined tensor");
      TORCH_CHECK(t.layout() == at::kStrided, "multi_tensor_dot: ", arg_name(list, i),
                  " must be a dense (strided) tensor, got layout ", t.layout());
      TORCH_CHECK(is_supported_float(t.scalar_type()), "multi_tensor_dot: ", arg_name(list, i),
                  " has dtype ", t.scalar_type(),
                  ", but only float32, float64, bfloat16 and float16 are supported");
      TORCH_CHECK(t.scalar_type() == first.scalar_type(),
                  "multi_tensor_dot: all tensors must have one dtype, but a[0] is ",
                  first.scalar_type(), " and ", arg_name(list, i), " is ", t.scalar_type());
      TORCH_CHECK(t.device() == first.device(),
                  "multi_tensor_dot: all tensors must be on one device, but a[0] is on ",
                  first.device(), " and ", arg_name(list, i), " is on ", t.device());
    }
    TORCH_CHECK(a[i].numel() == b[i].numel(), "multi_tensor_dot: ", arg_name("a", i), " and ",
                arg_name("b", i), " must have the same number of elements, but ",
                arg_name("a", i), " has ", a[i].numel(), " and ", arg_name("b", i), " has ",
                b[i].numel());
  }
}

at::ScalarType dot_result_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<at::Tensor> contiguous_list(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    out.push_back(t.contiguous());
  }
  return out;
}

}  // namespace hyperlr
