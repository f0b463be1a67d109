"""The compiled ops of hyperlr_ext, and what to do without them.

Importing this module never fails. It tries ``hyperlr_ext._C`` (whose import registers the ops as
``torch.ops.hyperlr_ext.*``) and records the outcome:

- ``EXTENSION_AVAILABLE``: the compiled module loaded and its ops are registered;
- ``EXTENSION_ERROR``: why not (not built, or the ImportError/OSError of a broken build, such as
  one compiled against another torch), else ``None``;
- ``CUDA_COMPILED``: the extension contains the CUDA kernels (not only the CPU ones);
- ``BUILT_WITH_TORCH``: the ``torch.__version__`` it was compiled against, else ``None``. Under
  another torch release the module is not used (one RuntimeWarning at import, then the
  pure-PyTorch paths), unless ``HYPERLR_ALLOW_TORCH_MISMATCH=1``.

Each public op here calls the compiled op when the extension is loaded and otherwise a pure-PyTorch
fallback with the same semantics, so callers need no branch of their own. Code that must have the
compiled kernels (a ``fused=True`` path) calls :func:`require_extension` first.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

__all__ = [
    "BUILT_WITH_TORCH",
    "CUDA_COMPILED",
    "EXTENSION_AVAILABLE",
    "EXTENSION_ERROR",
    "multi_tensor_dot",
    "require_extension",
]

_REINSTALL_HINT = (
    "Reinstall with `pip install --no-build-isolation .` from the source tree "
    "(torch must be installed first; `make install` does both)"
)


def _load_extension() -> tuple[ModuleType | None, str | None]:
    try:
        # import_module, not `from hyperlr_ext import _C`: that turns a missing module into a
        # vague "cannot import name" ImportError.
        _C = importlib.import_module("hyperlr_ext._C")
    except ModuleNotFoundError as exc:
        if exc.name == "hyperlr_ext._C":
            return None, (
                "hyperlr_ext._C is not built (this hyperlr_ext has no compiled module: it was "
                "installed without compiling, or is imported from the source tree)"
            )
        return None, f"importing hyperlr_ext._C failed: {type(exc).__name__}: {exc}"
    except (ImportError, OSError) as exc:
        # An undefined symbol or a missing library: the usual sign of a build against another torch.
        return None, (
            f"importing hyperlr_ext._C failed ({type(exc).__name__}: {exc}); it was probably "
            f"compiled against a torch other than the installed {torch.__version__}"
        )
    if not hasattr(torch.ops.hyperlr_ext, "multi_tensor_dot"):
        return None, "hyperlr_ext._C loaded but did not register torch.ops.hyperlr_ext"
    return _C, None


def _release(version: str) -> str:
    """The public release part of a version string: "2.14.1+cu130" -> "2.14.1"."""
    return version.split("+", 1)[0]


def torch_mismatch(built: str | None, installed: str) -> str | None:
    """Why a compiled module built against torch ``built`` must not run under ``installed``
    (another release: torch has no stable C++ ABI across versions), else None."""
    if built is None or _release(built) == _release(installed):
        return None
    return (
        f"hyperlr_ext._C was compiled against torch {built} but torch {installed} is installed, "
        "and torch has no stable C++ ABI across versions"
    )


_C, EXTENSION_ERROR = _load_extension()
BUILT_WITH_TORCH: str | None = _C.built_with_torch() if _C is not None else None
_MISMATCH = torch_mismatch(BUILT_WITH_TORCH, torch.__version__)
if _MISMATCH is not None:
    if os.environ.get("HYPERLR_ALLOW_TORCH_MISMATCH") == "1":
        warnings.warn(f"{_MISMATCH}; using it anyway (HYPERLR_ALLOW_TORCH_MISMATCH=1).",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
    else:
        # Said once, at import; every optimizer then runs its pure-PyTorch path.
        warnings.warn(
            f"{_MISMATCH}: hyperlr_ext falls back to its pure-PyTorch implementations. "
            f"{_REINSTALL_HINT} to get the compiled kernels back.",
            RuntimeWarning,
            stacklevel=2,
        )
        _C, EXTENSION_ERROR = None, f"{_MISMATCH} (the compiled module is not used)"
EXTENSION_AVAILABLE: bool = _C is not None
CUDA_COMPILED: bool = bool(_C is not None and _C.cuda_compiled())


def require_extension(what: str, *, cuda: bool = False) -> None:
    """Raise RuntimeError unless the compiled extension (with CUDA kernels if ``cuda``) is loaded.

    >>> require_extension("SGDHD(fused=True)")  # doctest: +SKIP
    """
    if not EXTENSION_AVAILABLE:
        raise RuntimeError(
            f"{what} needs the compiled extension hyperlr_ext._C, which is unavailable: "
            f"{EXTENSION_ERROR}. {_REINSTALL_HINT}, or use the pure-PyTorch path."
        )
    if cuda and not CUDA_COMPILED:
        raise RuntimeError(
            f"{what} needs the CUDA kernels of hyperlr_ext._C, but it was built CPU-only (torch "
            f"without CUDA, no nvcc found, or HYPERLR_CUDA=0 at build time). {_REINSTALL_HINT} "
            f"on a machine with nvcc, or use the pure-PyTorch path."
        )


# ---- multi_tensor_dot ----------------------------------------------------------------------------

_DOT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dot_result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_dot_args(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    """The checks of csrc/multi_tensor_dot.cpp, same messages (RuntimeError, like TORCH_CHECK)."""
    if len(a) != len(b):
        raise RuntimeError(
            f"multi_tensor_dot: a and b must have the same length, but a has {len(a)} tensors "
            f"and b has {len(b)}"
        )
    if not a:
        return
    first = a[0]
    for i in range(len(a)):
        for name, t in (("a", a[i]), ("b", b[i])):
            if t.layout != torch.strided:
                raise RuntimeError(
                    f"multi_tensor_dot: {name}[{i}] must be a dense (strided) tensor, got layout "
                    f"{t.layout}"
                )
            if t.dtype not in _DOT_DTYPES:
                raise RuntimeError(
                    f"multi_tensor_dot: {name}[{i}] has dtype {t.dtype}, but only float32, "
                    f"float64, bfloat16 and float16 are supported"
                )
            if t.dtype != first.dtype:
                raise RuntimeError(
                    f"multi_tensor_dot: all tensors must have one dtype, but a[0] is "
                    f"{first.dtype} and {name}[{i}] is {t.dtype}"
                )
            if t.device != first.device:
                raise RuntimeError(
                    f"multi_tensor_dot: all tensors must be on one device, but a[0] is on "
                    f"{first.device} and {name}[{i}] is on {t.device}"
                )
        torch._check(
            a[i].numel() == b[i].numel(),
            lambda i=i: (
                f"multi_tensor_dot: a[{i}] and b[{i}] must have the same number of elements, "
                f"but a[{i}] has {a[i].numel()} and b[{i}] has {b[i].numel()}"
            ),
        )


def _multi_tensor_dot_fallback(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Pure-PyTorch multi_tensor_dot: same result type and device, differentiable."""
    _check_dot_args(a, b)
    if not a:
        return torch.zeros((), dtype=torch.float32)
    acc_dtype = _dot_result_dtype(a[0].dtype)
    total = torch.zeros((), dtype=acc_dtype, device=a[0].device)
    for x, y in zip(a, b):
        if x.numel() > 0:
            total = total + torch.dot(x.reshape(-1).to(acc_dtype), y.reshape(-1).to(acc_dtype))
    return total


def multi_tensor_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    r"""Sum of dot products :math:`\sum_i \langle a_i, b_i \rangle` as a 0-dim tensor.

    ``a[i]`` and ``b[i]`` may have any shapes with equal ``numel()``; all tensors share one
    dtype (float32, float64, bfloat16 or float16) and one device. Accumulates and returns float32
    (float64 for float64 inputs) on the inputs' device, without a host sync. The compiled kernels
    reduce in a fixed order: the result is deterministic, independent of the thread count, and the
    CPU and CUDA kernels agree bit for bit. Empty lists give ``tensor(0.)`` on the CPU.

    >>> multi_tensor_dot([torch.ones(3)], [torch.full((3,), 2.0)])
    tensor(6.)
    """
    a, b = list(a), list(b)
    if EXTENSION_AVAILABLE:
        return torch.ops.hyperlr_ext.multi_tensor_dot(a, b)
    return _multi_tensor_dot_fallback(a, b)


def _multi_tensor_dot_fake(a: list[Tensor], b: list[Tensor]) -> Tensor:
    _check_dot_args(a, b)
    if not a:
        return torch.empty((), dtype=torch.float32)
    return a[0].new_empty((), dtype=_dot_result_dtype(a[0].dtype))


if EXTENSION_AVAILABLE:
    # Autograd is registered in C++ (csrc/ops.cpp), so a call under no_grad stays in C++.
    torch.library.register_fake("hyperlr_ext::multi_tensor_dot")(_multi_tensor_dot_fake)


# ---- fused SGD-HD (csrc/sgd_hd.h) ------------------------------------------------------------
# The ops mutate their arguments in place and return nothing; the fake kernels only check what
# can be checked from metadata (the C++ kernels check everything again).


def _check_sgd_hd_slots(op: str, params: list[Tensor], *slot_tensors: Tensor) -> None:
    for t in slot_tensors:
        torch._check(
            t.dim() == 1 and t.numel() in (1, len(params)),
            lambda: f"{op}: LR slot tensors must be 1-D with 1 or {len(params)} elements",
        )


def _check_log_lr_adam(op: str, lrs: Tensor, state: Tensor | None, settings) -> None:
    """The Adam hyper-optimizer's arguments: both absent, or 4 state values per slot and the 5
    settings."""
    if state is None:
        torch._check(len(settings) == 0, lambda: f"{op}: hyper_adam needs hyper_state")
        return
    torch._check(len(settings) == 5, lambda: f"{op}: hyper_adam must hold 5 values")
    torch._check(
        state.numel() == 4 * lrs.numel(),
        lambda: f"{op}: hyper_state must hold 4 values per LR slot",
    )


def _sgd_hd_reducing_fake(op: str):
    def fake(
        params, grads, objective_grads, momentum_buffers, prev_directions, has_previous,
        has_buffer, lrs, hypergrads, effective_lrs, lr_scale, prev_lr_scale, hyper_lr,
        weight_decay, momentum, dampening, nesterov, maximize, multiplicative,
        grad_scale=None, found_inf=None, hyper_state=None, hyper_adam=(),
    ) -> None:  # fmt: skip
        _check_sgd_hd_slots(op, params, lrs, hypergrads, effective_lrs)
        _check_log_lr_adam(op, lrs, hyper_state, hyper_adam)

    return fake


def _sgd_hd_param_step_fake(params, directions, effective_lrs, found_inf=None) -> None:
    _check_sgd_hd_slots("sgd_hd_param_step_", params, effective_lrs)


if EXTENSION_AVAILABLE:
    for _name in ("sgd_hd_direction_", "sgd_hd_lagged_step_"):
        torch.library.register_fake(f"hyperlr_ext::{_name}")(_sgd_hd_reducing_fake(_name))
    torch.library.register_fake("hyperlr_ext::sgd_hd_param_step_")(_sgd_hd_param_step_fake)


# ---- fused Adam-HD (csrc/adam_hd.h) -----------------------------------------------------------


def _adam_hd_reducing_fake(op: str):
    def fake(
        params, grads, objective_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
        has_previous, lrs, hypergrads, effective_lrs, lr_scale, prev_lr_scale, hyper_lr, beta1,
        beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, multiplicative,
        grad_scale=None, found_inf=None, hyper_state=None, hyper_adam=(),
    ) -> None:  # fmt: skip
        _check_sgd_hd_slots(op, params, lrs, hypergrads, effective_lrs)
        _check_log_lr_adam(op, lrs, hyper_state, hyper_adam)

    return fake


def _adam_hd_param_step_fake(
    params, exp_avgs, second_moments, steps, effective_lrs, beta1, beta2, eps, weight_decay,
    decoupled_weight_decay, found_inf=None,
) -> None:  # fmt: skip
    _check_sgd_hd_slots("adam_hd_param_step_", params, effective_lrs)


if EXTENSION_AVAILABLE:
    for _name in ("adam_hd_moments_", "adam_hd_lagged_step_"):
        torch.library.register_fake(f"hyperlr_ext::{_name}")(_adam_hd_reducing_fake(_name))
    torch.library.register_fake("hyperlr_ext::adam_hd_param_step_")(_adam_hd_param_step_fake)


# ---- fused tangent step of MARTHE / RTHO (csrc/tangent.h) -------------------------------------


def _check_tangent_scalars(op: str, *scalars: Tensor) -> None:
    for t in scalars:
        torch._check(t.dim() == 0, lambda: f"{op}: lr, mu and step must be 0-dim tensors")


def _tangent_sgd_step_fake(
    params, grads, hvps, momentum_buffers, z_params, z_buffers, directions, lr, mu, lr_scale,
    momentum, dampening, nesterov, weight_decay, first_step, found_inf=None,
) -> None:  # fmt: skip
    _check_tangent_scalars("tangent_sgd_step_", lr, mu)


def _tangent_adam_step_fake(
    params, grads, hvps, exp_avgs, exp_avg_sqs, z_params, z_exp_avgs, z_exp_avg_sqs, directions,
    lr, mu, step, lr_scale, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
    found_inf=None,
) -> None:  # fmt: skip
    _check_tangent_scalars("tangent_adam_step_", lr, mu, step)


if EXTENSION_AVAILABLE:
    torch.library.register_fake("hyperlr_ext::tangent_sgd_step_")(_tangent_sgd_step_fake)
    torch.library.register_fake("hyperlr_ext::tangent_adam_step_")(_tangent_adam_step_fake)


# ---- fused TLR window end (csrc/tlr.h) --------------------------------------------------------


def _tlr_window_fake(params, snapshots, prev_updates, lr, has_previous) -> Tensor:
    torch._check(lr.dim() == 0, lambda: "tlr_window_: lr must be a 0-dim tensor")
    return lr.new_empty((2,))


if EXTENSION_AVAILABLE:
    torch.library.register_fake("hyperlr_ext::tlr_window_")(_tlr_window_fake)


# ---- fused HyperLR pass (csrc/hyper_lr.h) -----------------------------------------------------


def _hyper_lr_sums_fake(
    params, grads, snapshots, has_previous, num_slots, weight_decay, maximize, grad_scale=None,
    found_inf=None,
) -> Tensor:  # fmt: skip
    torch._check(
        num_slots == 1 or num_slots == len(params),
        lambda: (
            f"hyper_lr_sums_: num_slots must be 1 or len(params) = {len(params)}, got {num_slots}"
        ),
    )
    if not params:
        return torch.empty((3, max(num_slots, 1)), dtype=torch.float32)
    return params[0].new_empty((3, num_slots), dtype=_dot_result_dtype(params[0].dtype))


if EXTENSION_AVAILABLE:
    torch.library.register_fake("hyperlr_ext::hyper_lr_sums_")(_hyper_lr_sums_fake)
