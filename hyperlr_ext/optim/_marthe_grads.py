"""Where MARTHE / RTHO get their derivatives: the gradient of the closure's loss (with a graph for
the Hessian product when it is taken by double backward), the validation gradient, and H z by
double backward or by finite differences; averaged over DDP ranks by MARTHE itself, or reduced by
FSDP2's own backward; of the loss times a GradScaler's scale under AMP.

Two ways to differentiate: ``torch.autograd.grad`` (the default: nothing touches ``p.grad``, and
the graph can be kept for the Hessian product), or ``loss.backward()`` reading ``p.grad``
(``by_backward``, for FSDP2's DTensor shards, whose gradients exist only as FSDP2's
reduce-scatter of the unsharded ones; ``p.grad`` is restored afterwards). Gradients come back as
plain tensors: the local shards under FSDP2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hyperlr_ext.optim._sharded import local_shards

__all__ = [
    "all_reduce_mean",
    "hvp_autograd",
    "hvp_finite_difference",
    "loss_grads",
    "loss_scale",
    "record_found_inf",
    "validation_grads",
]


def all_reduce_mean(tensors: list[Tensor], group: Any) -> list[Tensor]:
    """The mean over the ranks of ``group`` of every tensor, through one all-reduce of a flat
    buffer; the tensors themselves without a group."""
    import torch.distributed as dist

    if group is None or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def _differentiate(loss: Tensor, params: list[Tensor], *, graph: bool, by_backward: bool):
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


@torch.compiler.disable  # autograd's own work (double backward cannot be compiled)
def loss_grads(
    closure: Callable[[], Tensor],
    params: list[Tensor],
    *,
    graph: bool,
    scale: Tensor | None = None,
    by_backward: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """The closure's loss (detached, unscaled) and the gradients of the loss times ``scale``
    (AMP), with a graph for the Hessian product when ``graph``. Checks the closure contract: a
    scalar loss that requires grad, and no backward() inside the closure."""
    before = [(p.grad, None if p.grad is None else p.grad._version) for p in params]
    with torch.enable_grad():
        loss = closure()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"closure must return the training loss as a scalar tensor, got {got}")
    for p, (grad, version) in zip(params, before):
        if p.grad is not grad or (grad is not None and grad._version != version):
            raise ValueError(
                "closure must return the loss without calling backward(): MARTHE/RTHO "
                "differentiate it themselves (and a second time for the Hessian product)"
            )
    if not loss.requires_grad:
        raise ValueError("closure returned a loss that does not require grad")
    with torch.enable_grad():
        scaled = loss.reshape(()) if scale is None else loss.reshape(()) * scale
        grads = _differentiate(scaled, params, graph=graph, by_backward=by_backward)
    return loss.detach(), grads


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
                _differentiate(val_loss, params, graph=False, by_backward=by_backward)]  # fmt: skip


@torch.compiler.disable  # autograd's own work (double backward cannot be compiled)
def hvp_autograd(grads: list[Tensor], params: list[Tensor], z: list[Tensor]) -> list[Tensor]:
    """H z by differentiating the gradients (kept with their graph) once more."""
    # A once_differentiable op leaves an error node in the gradient's graph, which autograd
    # skips silently with allow_unused: refuse it here rather than use a zero Hessian.
    # (Skipped under torch.compile, which cannot inspect grad_fn; the error then comes from
    # autograd itself.)
    if not torch.compiler.is_compiling() and any(
        type(g.grad_fn).__name__ in ("Error", "DelayedError") for g in grads
    ):
        raise RuntimeError(
            "MARTHE/RTHO need the Hessian-vector product, but the loss goes through an op "
            'without double backward (once_differentiable); pass hvp="finite_difference"'
        )
    # Gradients of params the loss does not reach are constant zeros: their rows of H are 0.
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in params]
    try:
        with torch.enable_grad():
            out = torch.autograd.grad(
                [grads[i] for i in live], params, grad_outputs=[z[i] for i in live],
                retain_graph=True, allow_unused=True,
            )  # fmt: skip
    except RuntimeError as error:
        raise RuntimeError(
            "MARTHE/RTHO could not differentiate the gradient a second time (the Hessian-"
            "vector product); this model may not support double backward: pass "
            f'hvp="finite_difference". Original error: {error}'
        ) from error
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, out)]


@torch.compiler.disable  # autograd's own work
def hvp_finite_difference(
    closure: Callable[[], Tensor],
    params: list[Tensor],
    z: list[Tensor],
    eps: Tensor,
    *,
    scale: Tensor | None = None,
    by_backward: bool = False,
) -> list[Tensor]:
    """H z ~ (g(w + e z) - g(w - e z)) / (2 e) for a 0-dim ``eps`` on the device (no host read).
    The weights are put back bit for bit (a copy of them is kept meanwhile). Under FSDP2 the
    local shards of the weights move, and every rank's backward does the rest."""
    local_params, local_z = local_shards(params), local_shards(z)
    saved = [p.detach().clone() for p in local_params]
    out = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, v in zip(local_params, local_z):
                p.add_(sign * eps * v)
        try:
            _, g = loss_grads(closure, params, graph=False, scale=scale, by_backward=by_backward)
        finally:
            with torch.no_grad():
                for p, w in zip(local_params, saved):
                    p.copy_(w)
        out.append(g)
    return [(a - b) / (2 * eps) for a, b in zip(*out)]


def loss_scale(scaler: Any, optimizer: Any, device: torch.device) -> Tensor | None:
    """GradScaler's current scale as a 0-dim float32 tensor on ``device`` (no host read), or
    None without an enabled scaler."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is not OptState.READY:
        raise RuntimeError(
            "MARTHE.step(scaler=...) was already called since the last scaler.update()"
        )
    return scaler.scale(torch.ones((), dtype=torch.float32, device=device))


def record_found_inf(scaler: Any, optimizer: Any, found_inf: Tensor) -> None:
    """Hands the step's check to the scaler, as its own ``step`` would (GradScaler has no public
    entry for an optimizer that forms its own gradients), so that ``scaler.update()`` backs off
    or grows the scale."""
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"] = {found_inf.device: found_inf}
    state["stage"] = OptState.STEPPED
