// The hyperlr_ext library (its schemas: csrc/schemas.cpp), a device-generic fallback kernel and
// the autograd kernel of multi_tensor_dot, and the Python module hyperlr_ext._C whose import
// registers all of them.
// Kernels: csrc/<op>_cpu.cpp (CPU) and csrc/cuda/<op>.cu (CUDA), one file per op.
#include "ops.h"

#include "cpu_hd_reduce.h"

#include <ATen/Functions.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

namespace hyperlr {

namespace {

// For devices without a kernel of ours (and for empty lists, which carry no device): the same
// result type, built from ATen ops, in list order. Not bit-identical to the CPU/CUDA kernels.
at::Tensor multi_tensor_dot_composite(at::TensorList a, at::TensorList b) {
  check_multi_tensor_dot_args(a, b);
  if (a.empty()) {
    return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  }
  const at::ScalarType acc_dtype = dot_result_dtype(a[0].scalar_type());
  at::Tensor total = at::zeros({}, a[0].options().dtype(acc_dtype));
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].numel() == 0) {
      continue;
    }
    total = at::add(total, at::dot(a[i].reshape({-1}).to(acc_dtype), b[i].reshape({-1}).to(acc_dtype)));
  }
  return total;
}

at::Tensor call_multi_tensor_dot(at::TensorList a, at::TensorList b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hyperlr_ext::multi_tensor_dot", "")
                             .typed<at::Tensor(at::TensorList, at::TensorList)>();
  return op.call(a, b);
}

// d/da_i sum_j <a_j, b_j> = b_i and d/db_i = a_i, in each input's shape and dtype. A C++ autograd
// kernel (not torch.library.register_autograd) keeps the Autograd dispatch key cheap: calls under
// no_grad, as in an optimizer step, pay no Python.
class MultiTensorDotFunction : public torch::autograd::Function<MultiTensorDotFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList a,
                            at::TensorList b) {
    std::vector<at::Tensor> inputs(a.begin(), a.end());
    inputs.insert(inputs.end(), b.begin(), b.end());
    ctx->save_for_backward(inputs);
    ctx->saved_data["num_tensors"] = static_cast<int64_t>(a.size());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_multi_tensor_dot(a, b);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const std::vector<at::Tensor> inputs = ctx->get_saved_variables();
    const size_t n = static_cast<size_t>(ctx->saved_data["num_tensors"].toInt());
    const at::Tensor& grad = grad_outputs[0];
    torch::autograd::variable_list grads(2 * n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& a_i = inputs[i];
      const at::Tensor& b_i = inputs[n + i];
      grads[i] = grad.mul(b_i.to(grad.scalar_type()))
                     .reshape_symint(a_i.sym_sizes())
                     .to(a_i.scalar_type());
      grads[n + i] = grad.mul(a_i.to(grad.scalar_type()))
                         .reshape_symint(b_i.sym_sizes())
                         .to(b_i.scalar_type());
    }
    return grads;
  }
};

at::Tensor multi_tensor_dot_autograd(at::TensorList a, at::TensorList b) {
  return MultiTensorDotFunction::apply(a, b);
}

}  // namespace
}  // namespace hyperlr

TORCH_LIBRARY(hyperlr_ext, m) {
  hyperlr::define_ops(m);
}

TORCH_LIBRARY_IMPL(hyperlr_ext, CompositeExplicitAutograd, m) {
  m.impl("multi_tensor_dot", &hyperlr::multi_tensor_dot_composite);
}

TORCH_LIBRARY_IMPL(hyperlr_ext, Autograd, m) {
  m.impl("multi_tensor_dot", &hyperlr::multi_tensor_dot_autograd);
}

#ifndef HYPERLR_TORCH_VERSION
#define HYPERLR_TORCH_VERSION TORCH_VERSION
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "hyperlr_ext compiled ops; importing this module registers torch.ops.hyperlr_ext.*";
  m.def(
      "cuda_compiled",
      []() {
#if defined(HYPERLR_WITH_CUDA)
        return true;
#else
        return false;
#endif
      },
      "True if the CUDA kernels were compiled into this extension.");
  m.def(
      "set_cpu_avx2", &hyperlr::cpu::set_avx2_allowed, pybind11::arg("allowed"),
      "Allow (default) or forbid the AVX2 variants of the CPU kernels; returns whether they were "
      "in use. They compute the same bits; this exists so the tests can check that.");
  m.def(
      "cpu_avx2", &hyperlr::cpu::use_avx2,
      "True when the CPU kernels run their AVX2 variants (x86-64 CPU with AVX2).");
  m.def(
      "built_with_torch", []() { return std::string(HYPERLR_TORCH_VERSION); },
      "The torch version (torch.__version__) this extension was compiled against.");
}
