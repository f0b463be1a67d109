"""The plumbing of a MARTHE / RTHO step: the param-group spans, the dot products of the
hypergradient, and the derivatives: the gradient of the closure's loss (with a graph for the
Hessian product when it is taken by double backward), the validation gradient, and H z by
double backward or by finite differences; averaged over DDP ranks by MARTHE itself, or reduced
by FSDP2's own backward; of the loss times a GradScaler's scale under AMP. The two ways to
differentiate (``torch.autograd.grad``, or ``backward()`` through FSDP2) are in
hyperlr_ext/_common/grads.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hyperlr_ext._common.grads import differentiate, validation_grads
from hyperlr_ext._common.sharded import local_shards
from hyperlr_ext._dispatch import choose_implementation
from hyperlr_ext.functional._foreach_hd import flat_dot
from hyperlr_ext.functional._marthe_fused import fused_list_dot
from hyperlr_ext.functional.marthe import tensor_list_dot
from hyperlr_ext.optim._marthe_args import algorithm_of

__all__ = [
    "Span",
    "all_reduce_mean",
    "averaging_group",
    "direction_key",
    "hessian_products",
    "hvp_autograd",
    "hvp_finite_difference",
    "hyper_sums",
    "loss_grads",
    "loss_scale",
    "objective_grads",
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
        grads = differentiate(scaled, params, graph=graph, by_backward=by_backward)
    return loss.detach(), grads


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
    base: list[Tensor] | None = None,
) -> list[Tensor]:
    """H z ~ (g(w + e z) - g(w - e z)) / (2 e) for a 0-dim ``eps`` on the device (no host read);
    with ``base`` = g(w) given, the forward difference (g(w + e z) - g(w)) / e (one gradient
    evaluation instead of two, error O(e) instead of O(e^2)). The weights are put back bit for
    bit (a copy of them is kept meanwhile). Under FSDP2 the local shards of the weights move,
    and every rank's backward does the rest."""
    local_params, local_z = local_shards(params), local_shards(z)
    saved = [p.detach().clone() for p in local_params]
    out = []
    for sign in (1.0,) if base is not None else (1.0, -1.0):
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
    if base is not None:
        return [(a - b.detach()) / eps for a, b in zip(out[0], base)]
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


def averaging_group(distributed: bool | None) -> Any:
    """The default process group when gradients must be averaged across ranks (DDP), else
    None. MARTHE differentiates with torch.autograd.grad, which DDP's gradient hooks never
    see, so it averages its gradients and Hessian products itself (one all-reduce each).
    ``distributed``: None (whenever a process group of more than one rank is initialised),
    True (required) or False (never)."""
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is None:
        return dist.group.WORLD if active else None
    if distributed and not active:
        raise RuntimeError("MARTHE(distributed=True) needs an initialised process group")
    return dist.group.WORLD if distributed else None


def hessian_products(spans, state, grads, closure, world, scale, sums) -> list[Tensor]:
    """For MARTHE's param-group spans (with their ``state``, the optimizer's per-parameter
    state): H Z_w of the undamped tangent for every parameter, in the order of ``grads`` (zeros for
    groups that need none this step: Z_w is 0 on their first step, mu is fixed at 0, or
    ``hvp_every`` skips it); an empty list when no group needs one. ``closure`` is the loss
    whose Hessian is taken and ``grads`` its gradients at w (with their graph where a group
    takes the product by double backward). One double backward for all autograd groups;
    finite differences per group, e = fd_eps / |Z_w|."""
    if not any(span.needs_hvp for span in spans):
        return []
    params = [p for span in spans for p in span.params]
    hvps: list[Tensor | None] = [None] * len(params)
    autograd = [span for span in spans if span.needs_hvp and span.group["hvp"] == "autograd"]
    if autograd:
        ps = [p for span in autograd for p in span.params]
        indices = [i for span in autograd for i in range(len(params))[span.indices]]
        z = [state[p]["z_param"] for p in ps]
        for i, h in zip(indices, hvp_autograd([grads[i] for i in indices], ps, z)):
            hvps[i] = h
    for span, group_sums in zip(spans, sums):
        kind = span.group["hvp"]
        if span.needs_hvp and kind != "autograd":
            tiny = torch.finfo(group_sums.dtype).tiny
            eps = span.group["fd_eps"] / torch.sqrt(group_sums[2]).clamp_min(tiny)
            z = [state[p]["z_param"] for p in span.params]
            base = grads[span.indices] if kind == "forward_difference" else None
            hvps[span.indices] = hvp_finite_difference(
                closure, span.params, z, eps, scale=scale, by_backward=span.sharded, base=base
            )
    local = local_shards(params)
    hvps = [torch.zeros_like(p) if h is None else h for p, h in zip(local, hvps)]
    return all_reduce_mean(hvps, world)


@dataclass
class Span:
    """One param group's part of a step: its params that require grad, their slice of the step's
    flat gradient lists, whether its tangents exist yet, whether it needs a Hessian product,
    whether it holds DTensor shards (FSDP2), and which implementation steps it."""

    group: dict[str, Any]
    params: list[Tensor]
    indices: slice
    started: bool
    needs_hvp: bool
    sharded: bool
    implementation: str = field(init=False)

    def __post_init__(self) -> None:
        if self.sharded or not self.params:  # DTensor groups: the reference, on local shards
            self.implementation = "reference"
        else:
            self.implementation = choose_implementation(
                self.params, foreach=self.group.get("foreach"), fused=self.group["fused"],
                algorithm=algorithm_of(self.group["inner"]),
            )  # fmt: skip


def direction_key(group: dict[str, Any]) -> str | None:
    """Where d_{t-1} is kept for MARTHE's adaptive mu: with plain SGD momentum the buffer is
    the direction (no copy); otherwise a "direction" state tensor; None without adaptive mu."""
    if group["mu"] != "adaptive":
        return None
    if group["inner"] == "sgd" and group["momentum"] != 0 and not group["nesterov"]:
        return "momentum_buffer"
    return "direction"


def objective_grads(group, params, grads, val_grads) -> list[Tensor]:
    """grad E(w_t): the validation gradient, else the training objective's (L2 included)."""
    if val_grads is not None:
        return val_grads
    l2 = group["weight_decay"] if group["inner"] != "adamw" else 0.0
    # p detached: the sums need no graph through the decay term.
    return [g.add(p.detach(), alpha=l2) if l2 != 0 else g for g, p in zip(grads, params)]


def hyper_sums(spans, state, step_grads, val_grads, mesh) -> list[Tensor | None]:
    """For MARTHE's param-group spans (``state``: the optimizer's per-parameter state): per
    started group, [Delta, <d_{t-1}, grad E>, |Z_w|^2] (the last only for a
    finite-difference product, else 0), in the group's hyper dtype. Under FSDP2 these are
    the local shards' partial sums, and one all-reduce over the mesh adds every group's."""
    out: list[Tensor | None] = []
    for span in spans:
        if not span.started:
            out.append(None)
            continue
        group, states = span.group, [state[p] for p in span.params]
        dtype = group["learned_lr"].dtype
        list_dot = {"fused": fused_list_dot, "foreach": flat_dot}.get(
            span.implementation, tensor_list_dot
        )

        def dot(a: list[Tensor], b: list[Tensor], dtype=dtype, list_dot=list_dot) -> Tensor:
            return list_dot(local_shards(a), local_shards(b), dtype)

        group_val = None if val_grads is None else val_grads[span.indices]
        objective = objective_grads(
            group, local_shards(span.params), step_grads[span.indices], group_val
        )
        z = [s["z_param"] for s in states]
        zero = torch.zeros((), dtype=dtype, device=group["learned_lr"].device)
        key = direction_key(group)
        has_direction = key is not None and all(key in s for s in states)
        fd = span.needs_hvp and group["hvp"] != "autograd"
        out.append(torch.stack([
            dot(z, objective),
            dot([s[key] for s in states], objective) if has_direction else zero,
            dot(z, z) if fd else zero,
        ]))  # fmt: skip
    present = [o for o in out if o is not None]
    if mesh is not None and present:
        flat = torch.cat([o.to(torch.float64) for o in present])
        torch.distributed.all_reduce(flat, group=mesh)
        reduced = iter(flat.view(-1, 3).unbind(0))
        out = [None if o is None else next(reduced).to(o.dtype) for o in out]
    return out
