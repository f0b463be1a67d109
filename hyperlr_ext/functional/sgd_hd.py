"""SGD with hypergradient descent on the learning rate (SGD-HD, SGDN-HD).

Inner dynamics are exactly ``torch.optim.SGD`` (momentum, dampening, nesterov, L2 weight decay,
maximize); the update direction d_t is the decayed gradient, the momentum buffer, or for Nesterov
``g + momentum * buffer``. With momentum and no Nesterov the buffer *is* d_{t-1}; otherwise
d_{t-1} is kept in ``prev_directions``.

Three implementations share one signature: ``_single_tensor_sgd_hd`` (a plain loop, the readable
truth), ``_foreach_sgd_hd`` (``torch._foreach_*`` over the lists) and ``_fused_sgd_hd`` (the
compiled kernels, :mod:`hyperlr_ext.functional._sgd_hd_fused`). ``sgd_hd`` picks one through
:mod:`hyperlr_ext._dispatch`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperlr_ext._common.sharded import SumReducer
from hyperlr_ext._dispatch import choose_implementation
from hyperlr_ext.functional._foreach_hd import apply_steps_ as foreach_apply_steps_
from hyperlr_ext.functional._foreach_hd import skip_fold, unscale_, update_slots_
from hyperlr_ext.functional._hd_rule import (
    FoundInfGuard,
    LogLrAdam,
    apply_steps_,
    decayed_grads,
    unscaled_grads,
    update_learned_lrs_,
)
from hyperlr_ext.functional._sgd_hd_fused import _fused_sgd_hd

__all__ = ["sgd_hd"]


def _objective_grads(grads, objective_grads, maximize):
    if objective_grads is None:
        return grads
    return [torch.neg(g) if maximize else g for g in objective_grads]


def _previous_directions(momentum_buffers, prev_directions, has_previous, momentum, nesterov):
    keeps_buffer_as_direction = momentum != 0 and not nesterov
    source = momentum_buffers if keeps_buffer_as_direction else prev_directions
    return [d if ok else None for d, ok in zip(source, has_previous)]


def _store_direction(prev_directions, i, direction):
    if prev_directions[i] is None:
        prev_directions[i] = direction.detach().clone()
    else:
        prev_directions[i].copy_(direction)


def _directions_for_loop(decayed, momentum_buffers, prev_directions, momentum, dampening, nesterov):
    """torch.optim.SGD's update directions, one tensor at a time; updates the buffers."""
    directions = []
    for i, grad in enumerate(decayed):
        direction = grad
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = torch.clone(grad).detach()
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            direction = grad.add(buf, alpha=momentum) if nesterov else buf
        if momentum == 0 or nesterov:
            _store_direction(prev_directions, i, direction)
        directions.append(direction)
    return directions


def _directions_foreach(
    decayed, momentum_buffers, prev_directions, momentum, dampening, nesterov, skip=None
):
    """The same directions with ``torch._foreach_*`` calls over the lists; with ``skip``
    (:class:`SkipFold`) a skipped step leaves the buffers as they were and creates zeros."""
    directions = decayed
    if momentum != 0:
        new = [i for i, b in enumerate(momentum_buffers) if b is None]
        old = [i for i, b in enumerate(momentum_buffers) if b is not None]
        if old:
            bufs = [momentum_buffers[i] for i in old]
            torch._foreach_mul_(bufs, momentum if skip is None else skip.value(momentum, 1.0))
            torch._foreach_add_(bufs, [decayed[i] for i in old], alpha=1 - dampening)
        for i in new:
            momentum_buffers[i] = torch.clone(decayed[i]).detach()
        directions = (
            torch._foreach_add(decayed, momentum_buffers, alpha=momentum)
            if nesterov
            else list(momentum_buffers)
        )
    if momentum == 0 or nesterov:
        present = [i for i, d in enumerate(prev_directions) if d is not None]
        if present:
            targets = [prev_directions[i] for i in present]
            values = [directions[i] for i in present]
            if skip is None:
                torch._foreach_copy_(targets, values)
            else:
                skip.select_(targets, values)
        for i, d in enumerate(prev_directions):
            if d is None:
                kept = directions[i] if skip is None else torch.where(skip.skip, 0.0, directions[i])
                prev_directions[i] = kept.detach().clone()
    return directions


def _single_tensor_sgd_hd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    prev_directions: list[Tensor | None],
    has_previous: list[bool],
    lrs: list[Tensor],
    hypergrads: list[Tensor],
    effective_lrs: list[Tensor],
    objective_grads: list[Tensor] | None,
    *,
    lr_scale: float,
    prev_lr_scale: float,
    hyper_lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    multiplicative: bool,
    lr_lag: int,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    sum_reducer: SumReducer | None = None,
    log_lr_adam: LogLrAdam | None = None,
) -> None:
    """For-loop SGD-HD, the readable reference: one tensor at a time."""
    if not params:
        return
    guard = FoundInfGuard(
        found_inf,
        [params, momentum_buffers, prev_directions, lrs, hypergrads, effective_lrs,
         *([] if log_lr_adam is None else [log_lr_adam.states])],
    )  # fmt: skip
    grads = unscaled_grads(grads, grad_scale)
    # 1. The training gradient with L2 decay (the objective when there is no validation loss).
    decayed = decayed_grads(grads, params, weight_decay, maximize, foreach=False)
    objective = _objective_grads(decayed, objective_grads, maximize)

    # 2. The LR: reduce over every tensor of a slot first, then update it.
    previous = _previous_directions(
        momentum_buffers, prev_directions, has_previous, momentum, nesterov
    )
    update_learned_lrs_(
        objective, previous, lrs, hypergrads, effective_lrs, hyper_lr=hyper_lr,
        multiplicative=multiplicative, prev_lr_scale=prev_lr_scale, lr_scale=lr_scale,
        lr_lag=lr_lag, sum_reducer=sum_reducer, log_lr_adam=log_lr_adam,
    )  # fmt: skip

    # 3. torch.optim.SGD's step with the learned LR.
    directions = _directions_for_loop(
        decayed, momentum_buffers, prev_directions, momentum, dampening, nesterov
    )
    apply_steps_(params, directions, effective_lrs)
    guard.restore()


def _foreach_sgd_hd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    prev_directions: list[Tensor | None],
    has_previous: list[bool],
    lrs: list[Tensor],
    hypergrads: list[Tensor],
    effective_lrs: list[Tensor],
    objective_grads: list[Tensor] | None,
    *,
    lr_scale: float,
    prev_lr_scale: float,
    hyper_lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    multiplicative: bool,
    lr_lag: int,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    sum_reducer: SumReducer | None = None,
    log_lr_adam: LogLrAdam | None = None,
) -> None:
    """SGD-HD with list ops: a number of ATen ops per step that does not grow with the number of
    tensors (:mod:`._foreach_hd`); an inf/NaN step is folded into the step, nothing is copied."""
    if not params:
        return
    skip = skip_fold(found_inf, params, lrs[0].dtype)
    guard = FoundInfGuard(
        found_inf if skip is None else None,
        [params, momentum_buffers, prev_directions, lrs, hypergrads, effective_lrs,
         *([] if log_lr_adam is None else [log_lr_adam.states])],
    )  # fmt: skip
    grads = unscale_(grads, grad_scale)
    decayed = decayed_grads(grads, params, weight_decay, maximize, foreach=True)
    if skip is not None:
        decayed = skip.grads(decayed)
    objective = _objective_grads(decayed, objective_grads, maximize)
    previous = _previous_directions(
        momentum_buffers, prev_directions, has_previous, momentum, nesterov
    )
    step_lrs = update_slots_(
        objective, previous, lrs, hypergrads, effective_lrs, hyper_lr=hyper_lr,
        multiplicative=multiplicative, prev_lr_scale=prev_lr_scale, lr_scale=lr_scale,
        lr_lag=lr_lag, sum_reducer=sum_reducer, skip=skip, log_lr_adam=log_lr_adam,
    )  # fmt: skip
    directions = _directions_foreach(
        decayed, momentum_buffers, prev_directions, momentum, dampening, nesterov, skip
    )
    foreach_apply_steps_(params, directions, step_lrs)
    guard.restore()


def sgd_hd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    prev_directions: list[Tensor | None],
    has_previous: list[bool],
    lrs: list[Tensor],
    hypergrads: list[Tensor],
    effective_lrs: list[Tensor],
    objective_grads: list[Tensor] | None = None,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr_scale: float,
    prev_lr_scale: float,
    hyper_lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    multiplicative: bool,
    lr_lag: int,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    sum_reducer: SumReducer | None = None,
    log_lr_adam: LogLrAdam | None = None,
) -> None:
    """One SGD-HD step over a list of tensors that share ``lrs`` (one slot, or one per tensor).

    Mutates ``params``, the buffers, ``lrs`` (the learned LRs eta), ``hypergrads`` (dE/d eta) and
    ``effective_lrs`` (the LR each slot applied: ``lr_scale * eta``). ``momentum_buffers`` and
    ``prev_directions`` entries that are ``None`` are created. ``has_previous[i]`` says whether
    tensor i moved at the previous step (otherwise its d_{t-1} is 0). ``objective_grads`` are the
    validation gradients for the First-order (Val) variant, else the training gradient is used.
    AMP: ``grads`` are divided by ``grad_scale`` (GradScaler's g * (1 / S)); when ``found_inf`` is
    nonzero the step changes nothing (new buffers are created zero-filled). ``sum_reducer``: for
    the local shards of DTensor parameters (FSDP2), sums every rank's partial HD sums (see
    ``hyperlr_ext._common.sharded.sum_reducer``); the fused kernels do not take one.
    """
    impl = choose_implementation(params, foreach=foreach, fused=fused, algorithm="sgd_hd")
    func = {"single": _single_tensor_sgd_hd, "foreach": _foreach_sgd_hd, "fused": _fused_sgd_hd}[
        impl
    ]
    func(
        params,
        grads,
        momentum_buffers,
        prev_directions,
        has_previous,
        lrs,
        hypergrads,
        effective_lrs,
        objective_grads,
        lr_scale=lr_scale,
        prev_lr_scale=prev_lr_scale,
        hyper_lr=hyper_lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        multiplicative=multiplicative,
        lr_lag=lr_lag,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
        sum_reducer=sum_reducer,
        log_lr_adam=log_lr_adam,
    )
