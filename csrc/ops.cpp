// The op schemas of the hyperlr_ext library, their input checks, a device-generic fallback kernel,
// and the Python module hyperlr_ext._C whose import registers all of them.
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
  // sum_i <a[i], b[i]> as a 0-dim tensor on the inputs' device: float32 accumulation and result
  // (float64 for float64 inputs), fixed reduction order (deterministic).
  m.def("multi_tensor_dot(Tensor[] a, Tensor[] b) -> Tensor", {at::Tag::pt2_compliant_tag});
  // Fused SGD-HD (csrc/sgd_hd.h explains the arguments; hyperlr_ext/functional/_sgd_hd_fused.py
  // calls them). Exact mode: sgd_hd_direction_ then sgd_hd_param_step_; lr_lag=1:
  // sgd_hd_lagged_step_.
  m.def(
      "sgd_hd_direction_(Tensor[] params, Tensor[] grads, Tensor[] objective_grads, "
      "Tensor(a!)[] momentum_buffers, Tensor(b!)[] prev_directions, int[] has_previous, "
      "int[] has_buffer, Tensor(c!) lrs, Tensor(d!) hypergrads, Tensor(e!) effective_lrs, "
      "float lr_scale, float prev_lr_scale, float hyper_lr, float weight_decay, "
      "float momentum, float dampening, bool nesterov, bool maximize, bool multiplicative, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sgd_hd_param_step_(Tensor(a!)[] params, Tensor[] directions, Tensor effective_lrs, "
      "Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sgd_hd_lagged_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] objective_grads, "
      "Tensor(b!)[] momentum_buffers, Tensor(c!)[] prev_directions, int[] has_previous, "
      "int[] has_buffer, Tensor(d!) lrs, Tensor(e!) hypergrads, Tensor(f!) effective_lrs, "
      "float lr_scale, float prev_lr_scale, float hyper_lr, float weight_decay, "
      "float momentum, float dampening, bool nesterov, bool maximize, bool multiplicative, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  // Fused Adam-HD (csrc/adam_hd.h; hyperlr_ext/functional/_adam_hd_fused.py). Exact mode:
  // adam_hd_moments_ then adam_hd_param_step_; lr_lag=1: adam_hd_lagged_step_.
  m.def(
      "adam_hd_moments_(Tensor[] params, Tensor[] grads, Tensor[] objective_grads, "
      "Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, Tensor(c!)[] max_exp_avg_sqs, "
      "Tensor steps, int[] has_previous, Tensor(d!) lrs, Tensor(e!) hypergrads, "
      "Tensor(f!) effective_lrs, float lr_scale, float prev_lr_scale, float hyper_lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool amsgrad, bool maximize, bool multiplicative, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "adam_hd_param_step_(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] second_moments, "
      "Tensor steps, Tensor effective_lrs, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled_weight_decay, Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "adam_hd_lagged_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] objective_grads, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
      "Tensor steps, int[] has_previous, Tensor(e!) lrs, Tensor(f!) hypergrads, "
      "Tensor(g!) effective_lrs, float lr_scale, float prev_lr_scale, float hyper_lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool amsgrad, bool maximize, bool multiplicative, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  // The fused tangent step of MARTHE / RTHO (csrc/tangent.h; hyperlr_ext/functional/
  // _marthe_fused.py): the inner step and the tangent update of every state buffer, one pass.
  m.def(
      "tangent_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] hvps, "
      "Tensor(b!)[] momentum_buffers, Tensor(c!)[] z_params, Tensor(d!)[] z_buffers, "
      "Tensor(e!)[] directions, Tensor lr, Tensor mu, float lr_scale, float momentum, "
      "float dampening, bool nesterov, float weight_decay, bool first_step, "
      "Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "tangent_adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] hvps, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] z_params, "
      "Tensor(e!)[] z_exp_avgs, Tensor(f!)[] z_exp_avg_sqs, Tensor(g!)[] directions, "
      "Tensor lr, Tensor mu, Tensor step, float lr_scale, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled_weight_decay, Tensor? found_inf=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  // The fused TLR window end (csrc/tlr.h; hyperlr_ext/functional/tlr.py): u, the two sums and
  // the new snapshot in one pass; returns [<u_prev, u>, |u_prev|^2].
  m.def(
      "tlr_window_(Tensor[] params, Tensor(a!)[] snapshots, Tensor(b!)[] prev_updates, "
      "Tensor lr, bool has_previous) -> Tensor",
      {at::Tag::pt2_compliant_tag});
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
