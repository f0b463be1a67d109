"""The one place that decides which implementation of an algorithm runs.

Every functional entry point (``sgd_hd``, ``adam_hd``, ...) asks :func:`choose_implementation`
for ``"single"`` (the for-loop reference), ``"foreach"`` (``torch._foreach_*`` over lists) or
``"fused"`` (a compiled kernel from :mod:`hyperlr_ext._ops`). The optimizer classes call
:func:`check_fused_request` at construction so that an impossible ``fused=True`` fails early.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FUSED_ALGORITHMS", "check_fused_request", "choose_implementation"]

# Algorithms that have a fused kernel in this build. The HD kernels arrive with the fused-kernel
# work (csrc/cuda/*_hd.cu); until then the pure-PyTorch paths serve every device.
FUSED_ALGORITHMS: frozenset[str] = frozenset()


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


def choose_implementation(
    params: list[Tensor], *, foreach: bool | None, fused: bool | None, algorithm: str
) -> str:
    """Return ``"fused"``, ``"foreach"`` or ``"single"`` for this call.

    ``fused=True`` is honoured or refused (never silently downgraded). ``foreach=True`` or
    ``False`` is obeyed. The default follows torch.optim: foreach when every tensor is on a CUDA
    device (one launch per op instead of one per tensor), the for-loop elsewhere (torch's CPU
    ``_foreach_*`` ops are per-tensor loops with extra temporaries, slower than the loop).
    """
    if fused:
        check_fused_request(algorithm, foreach, fused)
        return "fused"
    if foreach is None:
        foreach = bool(params) and all(p.device.type == "cuda" for p in params)
    if not foreach or torch.jit.is_scripting():
        return "single"
    return "foreach"
