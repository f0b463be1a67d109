"""The one place that decides which implementation of an algorithm runs.

Every functional entry point (``sgd_hd``, ``adam_hd``, ...) asks :func:`choose_implementation`
for ``"single"`` (the for-loop reference), ``"foreach"`` (``torch._foreach_*`` over lists) or
``"fused"`` (a compiled kernel from :mod:`hyperlr_ext._ops`). The optimizer classes call
:func:`check_fused_request` at construction so that an impossible ``fused=True`` fails early.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FUSED_ALGORITHMS",
    "DEFAULT_FUSED",
    "FUSED_DEVICES",
    "check_fused_params",
    "check_fused_request",
    "choose_implementation",
]

# Algorithms that have a fused kernel in this build (csrc/<algorithm>_cpu.cpp for the CPU,
# csrc/cuda/<algorithm>.cu for CUDA); the others run the pure-PyTorch paths on every device.
FUSED_ALGORITHMS: frozenset[str] = frozenset(
    {"sgd_hd", "adam_hd", "marthe_sgd", "marthe_adam", "tlr", "hyper_lr"}
)
FUSED_DEVICES = ("cpu", "cuda")
# Where the fused kernels are the default (fused=None and foreach=None): the devices on which
# benchmarks/overhead.py measured them faster than foreach and the for-loop, and whose kernels the
# test suite has run. CUDA joins once the GPU tests have passed on a GPU.
DEFAULT_FUSED: dict[str, frozenset[str]] = {
    "sgd_hd": frozenset({"cpu"}),
    "adam_hd": frozenset({"cpu"}),
    "marthe_sgd": frozenset({"cpu"}),
    "marthe_adam": frozenset({"cpu"}),
    "tlr": frozenset({"cpu"}),
    "hyper_lr": frozenset({"cpu"}),
}
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_fused_request(algorithm: str, foreach: bool | None, fused: bool | None) -> None:
    """Raise a clear error when ``fused=True`` cannot be honoured (called by constructors)."""
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if not fused:
        return
    from hyperlr_ext import _ops

    _ops.require_extension(f"fused=True ({algorithm})")
    if algorithm not in FUSED_ALGORITHMS:
        raise RuntimeError(
            f"fused=True: this build has no fused kernel for {algorithm}; "
            f"use foreach=True (the pure-PyTorch path)."
        )


def check_fused_params(algorithm: str, params: list[Tensor]) -> None:
    """Raise a clear error when the fused kernels cannot take these params (one param group).

    Called by the constructors for every group and again by :func:`choose_implementation`, so a
    ``fused=True`` request is honoured or refused, never silently downgraded.
    """
    if not params:
        return
    for p in params:
        if p.device.type not in FUSED_DEVICES or not torch.is_floating_point(p):
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of "
                f"supported devices: {list(FUSED_DEVICES)} (got {p.dtype} on {p.device})."
            )
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1 or next(iter(dtypes)) not in FUSED_DTYPES:
        raise RuntimeError(
            f"fused=True ({algorithm}): the fused kernels need every param of a group to have "
            f"one dtype among float32, float64, bfloat16 and float16; got "
            f"{sorted(str(d) for d in dtypes)}. Use foreach=True (the pure-PyTorch path)."
        )
    if any(p.device.type == "cuda" for p in params):
        from hyperlr_ext import _ops

        _ops.require_extension(f"fused=True ({algorithm}) on CUDA", cuda=True)


def _fused_by_default(algorithm: str, params: list[Tensor]) -> bool:
    """True when the fused kernels can take these params and are the default on their device."""
    if not params or torch.jit.is_scripting():
        return False
    first = params[0]
    if first.device.type not in DEFAULT_FUSED.get(algorithm, ()) or first.dtype not in FUSED_DTYPES:
        return False
    from hyperlr_ext import _ops

    if not _ops.EXTENSION_AVAILABLE or (first.device.type == "cuda" and not _ops.CUDA_COMPILED):
        return False
    dtype, device = first.dtype, first.device
    return all(
        p.dtype == dtype and p.device == device and p.layout == torch.strided for p in params
    )


def choose_implementation(
    params: list[Tensor], *, foreach: bool | None, fused: bool | None, algorithm: str
) -> str:
    """Return ``"fused"``, ``"foreach"`` or ``"single"`` for this call.

    ``fused=True`` is honoured or refused (never silently downgraded). ``foreach=True`` or
    ``False`` is obeyed. With neither given, the fused kernels run wherever ``DEFAULT_FUSED``
    allows them and they can take the params; otherwise the default follows torch.optim: foreach
    when every tensor is on a CUDA device (one launch per op instead of one per tensor), the
    for-loop elsewhere (torch's CPU ``_foreach_*`` ops are per-tensor loops with extra
    temporaries, slower than the loop).
    """
    if fused:
        check_fused_request(algorithm, foreach, fused)
        # The constructor checked every param (check_fused_params); per step only what can change
        # cheaply: the device (the kernels check dtypes and devices of every tensor again).
        if params:
            check_fused_params(algorithm, params[:1])
        return "fused"
    if fused is None and foreach is None and _fused_by_default(algorithm, params):
        return "fused"
    if foreach is None:
        foreach = bool(params) and all(p.device.type == "cuda" for p in params)
    if not foreach or torch.jit.is_scripting():
        return "single"
    return "foreach"
