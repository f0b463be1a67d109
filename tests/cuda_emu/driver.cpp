// A driver of every emulated CUDA kernel for the sanitizer builds (make emu-sanitizers): the
// kernels of csrc/cuda and the emulation's own selftest kernels, run on small inputs that still
// reach every code path of the launcher (zero-size tensors, partial chunks, a tensor of several
// chunks, more tensors than one launch holds, per-tensor LR slots, AMP flags). ThreadSanitizer
// (threads as OS threads) or AddressSanitizer + UBSan then report any race, bad access or
// undefined behaviour; every report fails the run. The results themselves are compared with the
// CPU kernels by tests/test_cuda_emu.py.
//
// Usage: cuda_emu_driver [--small | --racy]
//   --small  only the small layout, in float32 and bfloat16 (ThreadSanitizer's OS threads are
//            slow: 512 of them meet at every barrier)
//   --racy   run only a kernel with a known data race (the block reduction before its fix): under
//            ThreadSanitizer the run must fail, which shows that the build detects races.
#include "cuda_emu.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/core/stack.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

using Tensors = std::vector<at::Tensor>;

c10::IValue list(const Tensors& tensors) {
  return c10::IValue(c10::List<at::Tensor>(tensors));
}

// Calls an op boxed; the trailing arguments not given take their schema defaults (a boxed call
// reads every argument of the schema from the stack).
std::vector<c10::IValue> call(const std::string& name, std::vector<c10::IValue> args) {
  const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow(("hyperlr_ext_emu::" + name).c_str(), "");
  const std::vector<c10::Argument>& schema = op.schema().arguments();
  for (size_t i = args.size(); i < schema.size(); ++i) {
    if (!schema[i].default_value().has_value()) {
      cuda_emu::fail("%s: argument %s not given", name.c_str(), schema[i].name().c_str());
    }
    args.push_back(*schema[i].default_value());
  }
  torch::jit::Stack stack(std::move(args));
  op.callBoxed(&stack);
  return stack;
}

// The Adam hyper-optimizer on log eta (hyper_state, hyper_adam) for `slots` LR slots, or the
// absent pair of the additive rule.
std::vector<c10::IValue> log_lr_adam(bool on, int64_t slots, at::ScalarType acc) {
  if (!on) {
    return {c10::IValue(), c10::IValue(std::vector<double>{})};
  }
  at::Tensor state = at::zeros({slots, 4}, acc);
  state.narrow(1, 2, 2).fill_(1.0);  // (m, v, beta1^0, beta2^0)
  return {state, c10::IValue(std::vector<double>{0.9, 0.999, 1e-20, 1e-8, 10.0})};
}

std::vector<c10::IValue> operator+(std::vector<c10::IValue> a, const std::vector<c10::IValue>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Sizes that reach the launcher's paths: empty, partial chunk, exactly one chunk, two chunks;
// with `many`, 40 more small tensors (more than one launch holds for 5 or more lists).
std::vector<int64_t> layout(bool many) {
  std::vector<int64_t> sizes{12, 0, 513, 65536, 65536 + 7};
  if (many) {
    for (int i = 0; i < 40; ++i) {
      sizes.push_back(1 + 37 * i);
    }
  }
  return sizes;
}

Tensors random(const std::vector<int64_t>& sizes, at::ScalarType dtype, double scale = 1.0,
               bool positive = false) {
  Tensors out;
  for (int64_t n : sizes) {
    at::Tensor t = at::randn({n}, at::kDouble) * scale;
    out.push_back((positive ? t.abs() : t).to(dtype));
  }
  return out;
}

std::vector<int64_t> ones(size_t n) {
  std::vector<int64_t> flags(n, 1);
  flags[0] = 0;  // one tensor without a previous direction
  return flags;
}

at::ScalarType acc_of(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void run_multi_tensor_dot(at::ScalarType dtype, bool many) {
  const auto sizes = layout(many);
  const Tensors a = random(sizes, dtype);
  const Tensors b = random(sizes, dtype);
  const at::Tensor got = call("multi_tensor_dot", {list(a), list(b)})[0].toTensor();
  double want = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    want += at::dot(a[i].to(at::kDouble), b[i].to(at::kDouble)).item<double>();
  }
  const double tolerance = dtype == at::kDouble ? 1e-9 : 1e-2;
  if (std::abs(got.item<double>() - want) > tolerance * (1.0 + std::abs(want))) {
    cuda_emu::fail("multi_tensor_dot: %g, expected about %g", got.item<double>(), want);
  }
}

void run_sgd_hd(at::ScalarType dtype, bool many, bool momentum, bool amp, bool log_adam) {
  const auto sizes = layout(many);
  const size_t n = sizes.size();
  const int64_t slots = many ? static_cast<int64_t>(n) : 1;
  const at::ScalarType acc = acc_of(dtype);
  const Tensors params = random(sizes, dtype);
  const Tensors grads = random(sizes, dtype);
  const Tensors buffers = momentum ? random(sizes, dtype) : Tensors{};
  const Tensors directions = momentum ? Tensors{} : random(sizes, dtype);
  const at::Tensor lrs = at::full({slots}, 0.01, acc);
  const at::Tensor hypergrads = at::zeros({slots}, acc);
  const at::Tensor effective_lrs = at::zeros({slots}, acc);
  const c10::IValue grad_scale = amp ? c10::IValue(at::full({1}, 4.0)) : c10::IValue();
  const c10::IValue found_inf = amp ? c10::IValue(at::zeros({1})) : c10::IValue();
  for (const char* op : {"sgd_hd_direction_", "sgd_hd_lagged_step_"}) {
    call(op, std::vector<c10::IValue>{list(params), list(grads), list(Tensors{}), list(buffers),
                                      list(directions), ones(n), std::vector<int64_t>(n, 1), lrs,
                                      hypergrads, effective_lrs, 0.5, 0.8, 0.05, 0.01,
                                      momentum ? 0.9 : 0.0, 0.0, false, false,
                                      many && !log_adam, grad_scale, found_inf} +
                 log_lr_adam(log_adam, slots, acc));
  }
  call("sgd_hd_param_step_",
       {list(params), list(momentum ? buffers : directions), effective_lrs, found_inf});
}

void run_adam_hd(at::ScalarType dtype, bool many, bool amsgrad, bool amp, bool log_adam) {
  const auto sizes = layout(many);
  const size_t n = sizes.size();
  const int64_t slots = many ? static_cast<int64_t>(n) : 1;
  const at::ScalarType acc = acc_of(dtype);
  const Tensors params = random(sizes, dtype);
  const Tensors grads = random(sizes, dtype);
  const Tensors exp_avgs = random(sizes, dtype, 0.1);
  const Tensors exp_avg_sqs = random(sizes, dtype, 0.1, true);
  const Tensors max_sqs = amsgrad ? random(sizes, dtype, 0.2, true) : Tensors{};
  const at::Tensor steps = at::full({static_cast<int64_t>(n)}, 4.0, acc);
  const at::Tensor lrs = at::full({slots}, 0.001, acc);
  const at::Tensor hypergrads = at::zeros({slots}, acc);
  const at::Tensor effective_lrs = at::zeros({slots}, acc);
  const c10::IValue grad_scale = amp ? c10::IValue(at::full({1}, 4.0)) : c10::IValue();
  const c10::IValue found_inf = amp ? c10::IValue(at::zeros({1})) : c10::IValue();
  for (const char* op : {"adam_hd_moments_", "adam_hd_lagged_step_"}) {
    call(op, std::vector<c10::IValue>{list(params), list(grads), list(grads), list(exp_avgs),
                                      list(exp_avg_sqs), list(max_sqs), steps, ones(n), lrs,
                                      hypergrads, effective_lrs, 0.5, 0.8, 1e-4, 0.9, 0.99, 1e-8,
                                      0.01, !amsgrad, amsgrad, false, many && !log_adam,
                                      grad_scale, found_inf} +
                 log_lr_adam(log_adam, slots, acc));
  }
  call("adam_hd_param_step_", {list(params), list(exp_avgs),
                               list(amsgrad ? max_sqs : exp_avg_sqs), steps, effective_lrs, 0.9,
                               0.99, 1e-8, 0.01, !amsgrad, found_inf});
}

void run_tangent(at::ScalarType dtype, bool many, bool adam, bool amp) {
  const auto sizes = layout(many);
  const at::ScalarType acc = acc_of(dtype);
  const Tensors params = random(sizes, dtype);
  const Tensors grads = random(sizes, dtype);
  const Tensors hvps = random(sizes, dtype);
  const Tensors z_params = random(sizes, dtype, 0.1);
  const Tensors directions = random(sizes, dtype);
  const at::Tensor lr = at::full({}, 0.01, acc);
  const at::Tensor mu = at::full({}, 0.7, acc);
  const c10::IValue found_inf = amp ? c10::IValue(at::zeros({1})) : c10::IValue();
  if (adam) {
    call("tangent_adam_step_",
         {list(params), list(grads), list(hvps), list(random(sizes, dtype, 0.1)),
          list(random(sizes, dtype, 0.1, true)), list(z_params), list(random(sizes, dtype, 0.1)),
          list(random(sizes, dtype, 0.1)), list(directions), lr, mu, at::full({}, 3.0, acc),
          0.5, 0.9, 0.99, 1e-8, 0.01, true, found_inf});
  } else {
    call("tangent_sgd_step_",
         {list(params), list(grads), list(hvps), list(random(sizes, dtype)), list(z_params),
          list(random(sizes, dtype, 0.1)), list(directions), lr, mu, 0.5, 0.9, 0.1, false, 0.01,
          false, found_inf});
  }
}

void run_tlr(at::ScalarType dtype, bool many) {
  const auto sizes = layout(many);
  const at::Tensor lr = at::full({}, 0.1, acc_of(dtype));
  call("tlr_window_", {list(random(sizes, dtype)), list(random(sizes, dtype)),
                       list(random(sizes, dtype)), lr, true});
}

void run_hyper_lr(at::ScalarType dtype, bool many, bool per_tensor, bool amp) {
  const auto sizes = layout(many);
  const size_t n = sizes.size();
  const int64_t slots = per_tensor ? static_cast<int64_t>(n) : 1;
  const c10::IValue grad_scale = amp ? c10::IValue(at::full({1}, 4.0)) : c10::IValue();
  const c10::IValue found_inf = amp ? c10::IValue(at::zeros({1})) : c10::IValue();
  call("hyper_lr_sums_", {list(random(sizes, dtype)), list(random(sizes, dtype)),
                          list(random(sizes, dtype)), ones(n), slots, 0.01, !many, grad_scale,
                          found_inf});
}

void run_selftests() {
  const at::Tensor sums = at::zeros({3});
  call("selftest", {std::string("block_sum"), sums, 3, 512});
  if (!at::equal(sums, at::full({3}, 512.0 * 513.0 / 2.0))) {
    cuda_emu::fail("selftest block_sum: wrong sums");
  }
  call("selftest", {std::string("warp_ops"), at::zeros({2 * 96 * 9}, at::kInt), 2, 96});
  const at::Tensor counters = at::zeros({5}, at::kInt);
  call("selftest", {std::string("atomics"), counters, 3, 64});
  if (counters[0].item<int>() != 192 || counters[4].item<int>() != 1) {
    cuda_emu::fail("selftest atomics: wrong counts");
  }
  call("selftest", {std::string("poison"), at::zeros({16}, at::kInt), 2, 64});
}

}  // namespace

int main(int argc, char** argv) {
  const std::string option = argc > 1 ? argv[1] : "";
  const bool racy = option == "--racy";
  const bool small = option == "--small";
  at::manual_seed(0);
  // ATen's own threads synchronise in uninstrumented OpenMP, which ThreadSanitizer cannot see.
  at::set_num_threads(1);
  if (racy) {
    call("selftest", {std::string("racy_block_sum"), at::zeros({512}), 1, 512});
    std::puts("cuda_emu_driver: the racy kernel ran");
    return 0;
  }
  run_selftests();
  const std::vector<at::ScalarType> dtypes =
      small ? std::vector<at::ScalarType>{at::kFloat, at::kBFloat16}
            : std::vector<at::ScalarType>{at::kFloat, at::kDouble, at::kBFloat16, at::kHalf};
  const std::vector<bool> layouts = small ? std::vector<bool>{false} : std::vector<bool>{false, true};
  for (at::ScalarType dtype : dtypes) {
    for (bool many : layouts) {
      run_multi_tensor_dot(dtype, many);
      run_sgd_hd(dtype, many, /*momentum=*/many, /*amp=*/!many, /*log_adam=*/false);
      run_sgd_hd(dtype, many, /*momentum=*/!many, /*amp=*/many, /*log_adam=*/false);
      run_sgd_hd(dtype, many, /*momentum=*/true, /*amp=*/many, /*log_adam=*/true);
      run_adam_hd(dtype, many, /*amsgrad=*/many, /*amp=*/!many, /*log_adam=*/false);
      run_adam_hd(dtype, many, /*amsgrad=*/false, /*amp=*/!many, /*log_adam=*/true);
      run_tangent(dtype, many, /*adam=*/false, /*amp=*/many);
      run_tangent(dtype, many, /*adam=*/true, /*amp=*/!many);
      run_tlr(dtype, many);
      run_hyper_lr(dtype, many, /*per_tensor=*/true, /*amp=*/!many);
      run_hyper_lr(dtype, many, /*per_tensor=*/false, /*amp=*/many);
    }
    std::printf("cuda_emu_driver: every kernel ran in %s\n", c10::toString(dtype));
  }
  const cuda_emu::Stats& s = cuda_emu::stats();
  std::printf("cuda_emu_driver: %lld launches, %lld blocks (seed %llu, %s threads)\n",
              static_cast<long long>(s.launches), static_cast<long long>(s.blocks),
              static_cast<unsigned long long>(cuda_emu::schedule().seed),
              cuda_emu::schedule().mode == cuda_emu::Mode::kThread ? "OS" : "fiber");
  return 0;
}
