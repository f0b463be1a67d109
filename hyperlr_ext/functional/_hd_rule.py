"""The hypergradient-descent (HD) learning-rate rule, shared by every HD optimizer.

Notation (docs/design.md, HD): the step is ``w_{t+1} = w_t - s_t * eta_t * d_t``, where
``eta_t`` is the learned LR, ``s_t`` the scheduler scale and ``d_t`` the update direction. The
hypergradient of the objective E at ``w_t`` with respect to the LR of the previous step is

    dE(w_t)/d eta_{t-1} = -<g_hat_t, s_{t-1} d_{t-1}> = -h_t,

and the LR moves against it:

    additive:        eta_t = max(eta_{t-1} + beta * h_t, 0)
    multiplicative:  eta_t = max(eta_{t-1} * (1 + beta * h_t / (|g_hat_t| |s_{t-1} d_{t-1}|)), 0)

One LR "slot" serves either a whole param group (the default) or one tensor (``per_tensor=True``);
the reduction over every tensor of a slot completes before the slot's LR changes.

With ``hyper_optimizer="adam"`` (:class:`LogLrAdam`) the hypergradient of log eta,
``q_t = eta_{t-1} * dE/d eta = -eta_{t-1} h_t``, drives an Adam step on log eta instead:

    m = b1 m + (1 - b1) q,   v = b2 v + (1 - b2) q^2,   p1 = b1 p1,   p2 = b2 p2
    eta_t = clamp(eta_{t-1} * exp(-alpha * (m / (1 - p1)) / (sqrt(v / (1 - p2)) + eps)),
                  lr_min, lr_max)

with alpha the hyper-LR; each slot keeps (m, v, p1, p2), starting at (0, 0, 1, 1), in the last
axis of its Adam state tensor. A slot that the previous step did not move (|s_{t-1} d_{t-1}| = 0,
as at an optimizer's first step) keeps eta and its Adam state: it has no hypergradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hyperlr_ext._common.sharded import SumReducer

__all__ = [
    "FoundInfGuard",
    "LogLrAdam",
    "log_lr_adam_",
    "nonfinite_check_",
    "apply_steps_",
    "decayed_grads",
    "update_learned_lrs_",
    "hd_rule_",
    "per_slot_sums",
    "reduce_sums",
    "slot_sums_per_tensor",
    "slot_of",
    "tensor_dots",
    "tensor_sq_norms",
    "unscaled_grads",
]


def slot_of(index: int, num_tensors: int, num_slots: int) -> int:
    """LR slot used by tensor ``index``: its own slot when there is one per tensor, else slot 0."""
    return index if num_slots == num_tensors else 0


def per_slot_sums(values: list[Tensor], num_slots: int) -> list[Tensor]:
    """Reduce per-tensor 0-dim values to one value per LR slot, in a fixed order."""
    if num_slots == len(values):
        return values
    if not values:
        raise ValueError("per_slot_sums needs at least one value")
    return [torch.stack(values).sum()]


def tensor_dots(a: list[Tensor], b: list[Tensor | None], acc_dtype: torch.dtype) -> list[Tensor]:
    """Per-tensor inner products <a_i, b_i> accumulated in ``acc_dtype``; a missing b_i gives 0."""
    out = []
    for x, y in zip(a, b):
        if y is None:
            out.append(torch.zeros((), dtype=acc_dtype, device=x.device))
        else:
            out.append(torch.dot(x.reshape(-1).to(acc_dtype), y.reshape(-1).to(acc_dtype)))
    return out


def tensor_sq_norms(a: list[Tensor | None], acc_dtype: torch.dtype, device) -> list[Tensor]:
    """Per-tensor squared L2 norms in ``acc_dtype``; a missing tensor gives 0."""
    out = []
    for x in a:
        if x is None:
            out.append(torch.zeros((), dtype=acc_dtype, device=device))
        else:
            flat = x.reshape(-1).to(acc_dtype)
            out.append(torch.dot(flat, flat))
    return out


@dataclass
class LogLrAdam:
    """The Adam hyper-optimizer on log eta for one step: its settings (the hyper-LR is its step
    size) and the Adam state of every LR slot (``states[i]``: slot i's (m, v, b1^n, b2^n) in the
    last axis)."""

    beta1: float
    beta2: float
    eps: float
    lr_min: float
    lr_max: float
    states: list[Tensor]

    def settings(self) -> list[float]:
        """The settings in the order the fused kernels take them (``hyper_adam``)."""
        return [self.beta1, self.beta2, self.eps, self.lr_min, self.lr_max]


def log_lr_adam_(lr: Tensor, hypergrad: Tensor, state: Tensor, active: Tensor, *, alpha: float,
                 adam: LogLrAdam) -> None:  # fmt: skip
    """One Adam step on log eta for the slots of ``lr`` (0-dim or 1-D) where ``active`` (the
    slots the previous step moved; the others keep eta and their state), in place: ``hypergrad``
    holds dE/d eta, ``state`` (``lr.shape + (4,)``) the slots' (m, v, b1^n, b2^n)."""
    new_state = state.clone()
    m, v, p1, p2 = new_state.unbind(-1)
    q = lr * hypergrad
    m.mul_(adam.beta1).add_(q * (1.0 - adam.beta1))
    v.mul_(adam.beta2).add_(q * q * (1.0 - adam.beta2))
    p1.mul_(adam.beta1)
    p2.mul_(adam.beta2)
    m_hat = m / (1.0 - p1)
    v_hat = v / (1.0 - p2)
    step = m_hat.div_(v_hat.sqrt_().add_(adam.eps)).mul_(alpha)
    new_lr = (lr * step.neg_().exp_()).clamp_(adam.lr_min, adam.lr_max)
    state.copy_(torch.where(active.unsqueeze(-1), new_state, state))
    lr.copy_(torch.where(active, new_lr, lr))


def hd_rule_(
    lrs: list[Tensor],
    hypergrads: list[Tensor],
    dots: list[Tensor],
    grad_sq: list[Tensor] | None,
    dir_sq: list[Tensor] | None,
    *,
    hyper_lr: float,
    multiplicative: bool,
    prev_lr_scale: float,
    log_lr_adam: LogLrAdam | None = None,
) -> None:
    """Update every LR slot in place from its reduced sums; all arguments are per slot.

    ``dots`` holds <g_hat_t, d_{t-1}> (unscaled), ``grad_sq``/``dir_sq`` the squared norms of
    g_hat_t and d_{t-1} (needed by the multiplicative rule and the Adam step); ``prev_lr_scale``
    is s_{t-1}. ``hypergrads`` receives dE/d eta = -h_t. With ``log_lr_adam`` the slots take the
    Adam step on log eta, those the previous step moved (|s_{t-1} d_{t-1}| > 0) only.
    """
    for i, (lr, hypergrad, dot) in enumerate(zip(lrs, hypergrads, dots)):
        torch.mul(dot, -prev_lr_scale, out=hypergrad)  # -h
        if log_lr_adam is not None:
            moved = dir_sq[i] > 0 if prev_lr_scale != 0 else torch.zeros_like(lr, dtype=torch.bool)
            log_lr_adam_(lr, hypergrad, log_lr_adam.states[i], moved, alpha=hyper_lr,
                         adam=log_lr_adam)  # fmt: skip
            continue
        if multiplicative:
            # |g||s d| as a product of square roots: the product of squares can overflow fp32.
            norms = grad_sq[i].sqrt().mul_(dir_sq[i].sqrt()).mul_(abs(prev_lr_scale))
            cosine = hypergrad / norms.clamp_min_(torch.finfo(norms.dtype).tiny)
            lr.mul_(cosine.mul_(-hyper_lr).add_(1.0))
        else:
            lr.sub_(hypergrad, alpha=hyper_lr)
        lr.clamp_min_(0.0)


def apply_steps_(params: list[Tensor], directions: list[Tensor], steps: list[Tensor]) -> None:
    """``param -= step * direction`` for every tensor, one at a time (no temporary the size of
    the parameter); ``steps`` has one LR or one per tensor.

    The product is formed in the LR's precision (fp32 or fp64), so a bf16/fp16 parameter is
    updated from fp32 math and rounded once.
    """
    per_tensor = steps if len(steps) == len(params) else steps * len(params)
    for param, direction, step in zip(params, directions, per_tensor):
        if param.dtype == step.dtype:
            param.addcmul_(direction, -step)  # p + d (-s): one pass
        else:
            param.copy_(param.to(step.dtype) - direction.to(step.dtype) * step)


def decayed_grads(
    grads: list[Tensor], params: list[Tensor], weight_decay: float, maximize: bool, foreach: bool
) -> list[Tensor]:
    """torch.optim's gradient preprocessing: negate for ``maximize``, then add L2 decay."""
    if foreach:
        out = torch._foreach_neg(grads) if maximize else list(grads)
        return torch._foreach_add(out, params, alpha=weight_decay) if weight_decay != 0 else out
    out = [torch.neg(g) for g in grads] if maximize else list(grads)
    if weight_decay != 0:
        out = [g.add(p, alpha=weight_decay) for g, p in zip(out, params)]
    return out


def slot_sums_per_tensor(objective, previous, num_slots, acc_dtype, norms):
    """Per LR slot (lists of 0-dim tensors): <g_hat, d_{t-1}>, and with ``norms`` |g_hat|^2 and
    |d_{t-1}|^2 (else None), from one dot per tensor; a ``None`` in ``previous`` adds 0."""
    dots = per_slot_sums(tensor_dots(objective, previous, acc_dtype), num_slots)
    if not norms:
        return dots, None, None
    device = objective[0].device
    grad_sq = per_slot_sums(tensor_sq_norms(objective, acc_dtype, device), num_slots)
    dir_sq = per_slot_sums(tensor_sq_norms(previous, acc_dtype, device), num_slots)
    return dots, grad_sq, dir_sq


def reduce_sums(dots, grad_sq, dir_sq, reducer):
    """The partial sums of every slot (lists, the norms None without the multiplicative rule)
    through ``reducer`` (FSDP2's sum over the mesh), in one call; as they are without one."""
    if reducer is None:
        return dots, grad_sq, dir_sq
    parts = [dots] + ([grad_sq, dir_sq] if grad_sq is not None else [])
    reduced = reducer([t for part in parts for t in part])
    n = len(dots)
    dots = reduced[:n]
    if grad_sq is not None:
        grad_sq, dir_sq = reduced[n : 2 * n], reduced[2 * n :]
    return dots, grad_sq, dir_sq


def update_learned_lrs_(
    objective: list[Tensor],
    previous: list[Tensor | None],
    lrs: list[Tensor],
    hypergrads: list[Tensor],
    effective_lrs: list[Tensor],
    *,
    hyper_lr: float,
    multiplicative: bool,
    prev_lr_scale: float,
    lr_scale: float,
    lr_lag: int,
    sum_reducer: SumReducer | None = None,
    log_lr_adam: LogLrAdam | None = None,
) -> None:
    """The HD half of a step: reduce <g_hat, d_{t-1}> (and the norms) over every tensor of each
    slot, update the learned LRs, and write into ``effective_lrs`` the LR this step applies
    (``lr_scale`` times eta_t, or eta_{t-1} with ``lr_lag=1``). A ``None`` in ``previous`` is a
    tensor without d_{t-1}. ``sum_reducer``: for the local shards of DTensor parameters (FSDP2),
    sums the partial sums of every rank (all of them in one call) before the rule.
    ``log_lr_adam``: the Adam step on log eta instead of the additive or multiplicative rule."""
    applied = [lr.clone() for lr in lrs] if lr_lag else lrs
    norms = multiplicative or log_lr_adam is not None
    sums = slot_sums_per_tensor(objective, previous, len(lrs), lrs[0].dtype, norms)
    dots, grad_sq, dir_sq = reduce_sums(*sums, sum_reducer)
    hd_rule_(
        lrs,
        hypergrads,
        dots,
        grad_sq,
        dir_sq,
        hyper_lr=hyper_lr,
        multiplicative=multiplicative,
        prev_lr_scale=prev_lr_scale,
        log_lr_adam=log_lr_adam,
    )
    for effective, lr in zip(effective_lrs, applied):
        effective.copy_(lr * lr_scale)


def unscaled_grads(grads: list[Tensor], grad_scale: Tensor | None) -> list[Tensor]:
    """AMP: the gradients divided by ``grad_scale`` as GradScaler does it, g * (1 / S) in fp32."""
    if grad_scale is None:
        return grads
    inv_scale = grad_scale.reciprocal().reshape(())
    return [g * inv_scale for g in grads]


def nonfinite_check_(tensors: list[Tensor], inv_scale: Tensor | None = None) -> Tensor:
    """Multiplies every tensor by ``inv_scale`` (a 0-dim float32 tensor; 1 when None) in place and
    returns a float32 flag of one element on the first tensor's device, nonzero when any value is
    inf or NaN. torch's own fused check (the one GradScaler runs), per device and dtype; the
    flags of other devices are added on the device, never read on the host."""
    flags = []
    for device in dict.fromkeys(t.device for t in tensors):
        on_device = [t for t in tensors if t.device == device]
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.ones(1, dtype=torch.float32, device=device) if inv_scale is None else (
            inv_scale.to(device=device, dtype=torch.float32).reshape(1))  # fmt: skip
        for dtype in dict.fromkeys(t.dtype for t in on_device):
            torch._amp_foreach_non_finite_check_and_unscale_(
                [t for t in on_device if t.dtype == dtype], flag, inv
            )
        flags.append(flag)
    first = flags[0]
    for other in flags[1:]:
        first = first + other.to(first.device, non_blocking=True)
    return first


class FoundInfGuard:
    """Makes a reference step a no-op when AMP's ``found_inf`` is nonzero, without a host sync.

    ``before`` snapshots the mutable state; ``after`` puts the snapshot back where ``found_inf`` is
    set (a device-side select) and gives tensors created by the step the value 0, as the fused
    kernels' zero-filled new buffers have.
    """

    def __init__(self, found_inf: Tensor | None, lists: list[list[Tensor | None]]) -> None:
        self.found_inf = found_inf
        self.lists = lists
        self.saved = (
            None
            if found_inf is None
            else [[None if t is None else t.clone() for t in ts] for ts in lists]
        )

    def restore(self) -> None:
        if self.found_inf is None:
            return
        skip = self.found_inf.reshape(()) != 0
        for ts, saved in zip(self.lists, self.saved):
            for t, old in zip(ts, saved):
                if t is not None:
                    t.copy_(torch.where(skip, torch.zeros_like(t) if old is None else old, t))
