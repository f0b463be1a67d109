"""Derivatives of a closure's loss, for MARTHE/RTHO and MLR-SNet's meta step.

Two ways: ``torch.autograd.grad`` (the default: nothing touches ``p.grad``, and a graph can be
kept for a Hessian product), or ``loss.backward()`` reading ``p.grad`` (``by_backward``, for
FSDP2's DTensor shards, whose gradients exist only as FSDP2's reduce-scatter of the unsharded
ones; ``p.grad`` is put back afterwards). Gradients come back as plain tensors: the local shards
under FSDP2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hyperlr_ext._common.sharded import local_shards

__all__ = ["differentiate", "validation_grads"]


def differentiate(loss: Tensor, params: list[Tensor], *, graph: bool, by_backward: bool):
    """d loss / d params (zeros for params the loss does not reach)."""
    if not by_backward:
        grads = torch.autograd.grad(loss, params, create_graph=graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        grads = [p.grad for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return [
        torch.zeros_like(local) if g is None else g
        for local, g in zip(local_shards(params), local_shards(grads))
    ]


@torch.compiler.disable  # autograd's own work
def validation_grads(
    val_closure: Callable[[], Tensor],
    params: list[Tensor],
    *,
    scale: Tensor | None = None,
    by_backward: bool = False,
) -> list[Tensor]:
    """Gradients of the validation loss (times ``scale`` when given)."""
    with torch.enable_grad():
        val_loss = val_closure().reshape(())
        if scale is not None:
            val_loss = val_loss * scale
        return [g.detach() for g in
                differentiate(val_loss, params, graph=False, by_backward=by_backward)]  # fmt: skip
