"""The pass of :class:`hyperlr_ext.HyperLR`, HD over any optimizer (docs/design.md, HyperLR).

Before step t the wrapper holds a snapshot of the weights taken before step t-1, so that
``snapshot - w_t = s_{t-1} eta_{t-1} d_{t-1}``: the previous update, whatever the optimizer. One
pass over the group's tensors forms, per LR slot,

    <g_hat_t, snapshot - w_t>,   |g_hat_t|^2,   |snapshot - w_t|^2

(g_hat = grad / grad_scale, negated for ``maximize``, plus ``weight_decay * w`` when the wrapped
optimizer's decay is an L2 term of the objective) and writes the new snapshot ``w_t``, unless
AMP's ``found_inf`` is set (then the step is skipped and the old snapshot stays). A tensor with
``has_previous`` 0 (no snapshot yet, or not stepped last time) adds nothing to the first and last
sums; its snapshot is written even on a skipped step (the weights did not move, so at the next
step its update is 0, as it is without one). ``hyper_lr_sums_`` is the readable reference,
``foreach_hyper_lr_sums_`` the list-op path and ``fused_hyper_lr_sums_`` calls the compiled
kernel of csrc/hyper_lr*.{h,cpp} and csrc/cuda/hyper_lr.cu with the same arguments.
:func:`hyper_lr_rule_` turns the sums into the new learned LR on the device.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from hyperlr_ext.functional._foreach_hd import slot_sums
from hyperlr_ext.functional._hd_rule import LogLrAdam, hd_rule_

__all__ = [
    "foreach_hyper_lr_sums_",
    "fused_hyper_lr_sums_",
    "hyper_lr_rule_",
    "hyper_lr_sums_",
    "pass_implementation",
]


def _acc_dtype(params: list[Tensor]) -> torch.dtype:
    return torch.float64 if params and params[0].dtype == torch.float64 else torch.float32


def _check_slots(num_slots: int, params: list[Tensor]) -> None:
    if num_slots not in (1, len(params)):
        raise ValueError(f"num_slots must be 1 or len(params) = {len(params)}, got {num_slots}")


def hyper_lr_sums_(
    params: list[Tensor],
    grads: list[Tensor],
    snapshots: list[Tensor],
    has_previous: list[int],
    num_slots: int,
    *,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    """Returns a ``[3, num_slots]`` tensor (float32; float64 for float64 params, on the params'
    device) of the sums above, ``num_slots`` 1 (the group) or ``len(params)`` (one per tensor),
    and writes ``snapshots[i] <- params[i]`` (kept where ``found_inf`` is nonzero and
    ``has_previous[i]`` set)."""
    _check_slots(num_slots, params)
    acc = _acc_dtype(params)
    device = params[0].device if params else torch.device("cpu")
    sums = torch.zeros(3, max(num_slots, 1), dtype=acc, device=device)
    inv_scale = None if grad_scale is None else grad_scale.reciprocal().reshape(()).to(acc)
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for i, (w, g, snapshot, previous) in enumerate(zip(params, grads, snapshots, has_previous)):
        slot = i if num_slots == len(params) else 0
        weight = w.detach().reshape(-1).to(acc)
        objective = g.reshape(-1).to(acc)
        if inv_scale is not None:
            objective = objective * inv_scale
        if maximize:
            objective = -objective
        if weight_decay != 0:
            objective = objective + weight_decay * weight
        sums[1, slot] += torch.dot(objective, objective)
        if previous:
            update = snapshot.reshape(-1).to(acc) - weight
            sums[0, slot] += torch.dot(objective, update)
            sums[2, slot] += torch.dot(update, update)
        keep = skip is not None and previous
        snapshot.copy_(torch.where(skip, snapshot, w.detach()) if keep else w.detach())
    return sums


def foreach_hyper_lr_sums_(
    params: list[Tensor],
    grads: list[Tensor],
    snapshots: list[Tensor],
    has_previous: list[int],
    num_slots: int,
    *,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    """``hyper_lr_sums_`` with ``torch._foreach_*`` ops: on a GPU a number of launches that does
    not grow with the number of tensors (the sums by :func:`slot_sums`), at the price of
    temporaries the size of the gradients."""
    _check_slots(num_slots, params)
    acc = _acc_dtype(params)
    if not params:
        return torch.zeros(3, max(num_slots, 1), dtype=acc)
    weights = [p.detach() for p in params]
    # bfloat16/float16 lists go to float32 first (one conversion per tensor), as the other
    # passes compute; float32/float64 lists are used as they are.
    low = params[0].dtype != acc
    wide = [w.to(acc) for w in weights] if low else weights
    objective = [g.to(acc) for g in grads] if low else list(grads)
    if grad_scale is not None:
        inv_scale = grad_scale.reciprocal().reshape(())
        objective = torch._foreach_mul(objective, inv_scale.to(acc))
    if maximize:
        objective = torch._foreach_neg(objective)
    if weight_decay != 0:
        objective = torch._foreach_add(objective, wide, alpha=weight_decay)
    present = [i for i, flag in enumerate(has_previous) if flag]
    previous: list[Tensor | None] = [None] * len(params)
    if present:
        olds = [snapshots[i].to(acc) if low else snapshots[i] for i in present]
        deltas = torch._foreach_sub(olds, [wide[i] for i in present])
        for i, delta in zip(present, deltas):
            previous[i] = delta
    dots, grad_sq, dir_sq = slot_sums(objective, previous, num_slots, acc, True)
    if found_inf is None:
        torch._foreach_copy_(snapshots, weights)
    else:
        skip = found_inf.reshape(()) != 0
        for snapshot, weight, flag in zip(snapshots, weights, has_previous):
            snapshot.copy_(torch.where(skip, snapshot, weight) if flag else weight)
    return torch.stack([dots.reshape(-1), grad_sq.reshape(-1), dir_sq.reshape(-1)])


def fused_hyper_lr_sums_(
    params: list[Tensor],
    grads: list[Tensor],
    snapshots: list[Tensor],
    has_previous: list[int],
    num_slots: int,
    *,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    """``hyper_lr_sums_`` by the compiled one-pass kernel (same arguments, same results up to
    the order of the sums)."""
    return torch.ops.hyperlr_ext.hyper_lr_sums_(
        [p.detach() for p in params], grads, snapshots, [int(h) for h in has_previous],
        num_slots, weight_decay, maximize, grad_scale, found_inf,
    )  # fmt: skip


_PASSES = {
    "single": hyper_lr_sums_,
    "foreach": foreach_hyper_lr_sums_,
    "fused": fused_hyper_lr_sums_,
}


def pass_implementation(implementation: str):
    """The pass for ``"single"``, ``"foreach"`` or ``"fused"`` (hyperlr_ext._dispatch decides)."""
    return _PASSES[implementation]


def hyper_lr_rule_(
    lrs: Tensor,
    hypergrads: Tensor,
    sums: Tensor,
    prev_lrs: Tensor,
    *,
    hyper_lr: float,
    multiplicative: bool,
    found_inf: Tensor | None = None,
    log_lr_adam: LogLrAdam | None = None,
) -> None:
    """The HD rule of every slot (1-D tensors of the slots' count, or 0-dim for one slot) from
    the pass's sums, in place on the device.

    ``prev_lrs`` holds eta_{t-1}, the learned LR the previous step applied, so that
    ``(snapshot - w_t) / eta_{t-1} = s_{t-1} d_{t-1}`` as the rule wants; where it is 0 the
    previous step did not move the weights and h_t = 0. ``found_inf`` nonzero leaves ``lrs``,
    ``hypergrads`` and the Adam state as they were. ``log_lr_adam`` (its one state tensor:
    ``lrs.shape + (4,)``): the Adam step on log eta instead of the additive or multiplicative
    rule.
    """
    inverse = torch.where(prev_lrs > 0, prev_lrs, 1.0).reciprocal()
    inverse = torch.where(prev_lrs > 0, inverse, 0.0).reshape(-1)
    norms = multiplicative or log_lr_adam is not None
    dots = sums[0] * inverse
    grad_sq = sums[1] if norms else None
    dir_sq = sums[2] * inverse * inverse if norms else None
    mutated = [lrs, hypergrads] + ([] if log_lr_adam is None else log_lr_adam.states)
    old = None if found_inf is None else [t.clone() for t in mutated]
    adam = None
    if log_lr_adam is not None:
        adam = replace(log_lr_adam, states=[log_lr_adam.states[0].view(-1, 4)])
    flat_lrs, flat_hypergrads = lrs.view(-1), hypergrads.view(-1)
    hd_rule_(
        [flat_lrs], [flat_hypergrads], [dots], None if grad_sq is None else [grad_sq],
        None if dir_sq is None else [dir_sq], hyper_lr=hyper_lr, multiplicative=multiplicative,
        prev_lr_scale=1.0, log_lr_adam=adam,
    )  # fmt: skip
    if old is not None:
        skip = found_inf.reshape(()) != 0
        for t, saved in zip(mutated, old):
            t.copy_(torch.where(skip, saved, t))
