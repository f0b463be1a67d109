"""Adam with hypergradient descent on the learning rate (Adam-HD), additive or multiplicative.

Inner dynamics are exactly ``torch.optim.Adam`` (L2 ``weight_decay``, ``amsgrad``, ``maximize``)
and ``torch.optim.AdamW`` (``decoupled_weight_decay=True``). The update direction is

    d_t = m_t / (1 - beta1^t) / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)   (+ lambda * w_t for AdamW),

and d_{t-1} is recomputed from the moments before they change, so Adam-HD keeps no extra state.
For AdamW, w_{t-1} is gone, but w_t = w_{t-1} - c (a + lambda w_{t-1}) with c the LR applied at
t-1 gives d_{t-1} = (a_{t-1} + lambda w_t) / (1 - lambda c).

The step count of each tensor is a device tensor (the LR's dtype), so bias corrections are formed
on the device and ``step()`` never synchronises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperlr_ext._common.sharded import SumReducer
from hyperlr_ext._dispatch import choose_implementation
from hyperlr_ext.functional._adam_hd_fused import _fused_adam_hd
from hyperlr_ext.functional._foreach_hd import apply_steps_ as foreach_apply_steps_
from hyperlr_ext.functional._foreach_hd import skip_fold, unscale_, update_slots_
from hyperlr_ext.functional._hd_rule import (
    FoundInfGuard,
    LogLrAdam,
    apply_steps_,
    decayed_grads,
    slot_of,
    unscaled_grads,
    update_learned_lrs_,
)

__all__ = ["adam_hd"]


def _adam_direction(exp_avg, second_moment, step, beta1, beta2, eps):
    """m_hat / (sqrt(v_hat) + eps), with torch.optim.Adam's denominator; one temporary."""
    bias_correction1 = 1 - torch.pow(beta1, step)
    bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
    direction = second_moment.sqrt().div_(bias_correction2_sqrt).add_(eps)
    return torch.div(exp_avg, direction, out=direction).div_(bias_correction1)


def _previous_direction(
    param, exp_avg, second_moment, step, applied_lr, *, beta1, beta2, eps, weight_decay, decoupled
):
    direction = _adam_direction(exp_avg, second_moment, step, beta1, beta2, eps)
    if decoupled and weight_decay != 0:
        direction.add_(param, alpha=weight_decay).div_(1 - weight_decay * applied_lr)
    return direction


def _foreach_adam_directions(exp_avgs, second_moments, steps, beta1, beta2, eps):
    """:func:`_adam_direction` for every tensor with list ops (the same operations in the same
    order); the bias corrections of every step count at once."""
    bias_correction1 = torch._foreach_pow(beta1, steps)
    torch._foreach_sub_(bias_correction1, 1)
    torch._foreach_neg_(bias_correction1)
    bias_correction2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_sub_(bias_correction2_sqrt, 1)
    torch._foreach_neg_(bias_correction2_sqrt)
    torch._foreach_sqrt_(bias_correction2_sqrt)
    denom = torch._foreach_sqrt(second_moments)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    directions = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(directions, bias_correction1)
    return directions


def _foreach_previous_directions(params, exp_avgs, second_moments, steps, effective_lrs, *,
                                 beta1, beta2, eps, weight_decay, decoupled):  # fmt: skip
    """d_{t-1} of every listed tensor; ``effective_lrs`` holds one LR, or one per tensor."""
    directions = _foreach_adam_directions(exp_avgs, second_moments, steps, beta1, beta2, eps)
    if decoupled and weight_decay != 0:
        torch._foreach_add_(directions, params, alpha=weight_decay)
        # 1 - lambda c for every slot at once.
        shrink = torch.stack(effective_lrs).mul_(-weight_decay).add_(1)
        if len(effective_lrs) == 1:
            torch._foreach_div_(directions, shrink.view(()))
        else:
            torch._foreach_div_(directions, list(shrink.unbind(0)))
    return directions


def _single_tensor_adam_hd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    has_previous: list[bool],
    lrs: list[Tensor],
    hypergrads: list[Tensor],
    effective_lrs: list[Tensor],
    objective_grads: list[Tensor] | None,
    *,
    lr_scale: float,
    prev_lr_scale: float,
    hyper_lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    multiplicative: bool,
    lr_lag: int,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    sum_reducer: SumReducer | None = None,
    log_lr_adam: LogLrAdam | None = None,
) -> None:
    """For-loop Adam-HD, the readable reference: one tensor at a time."""
    if not params:
        return
    n, num_slots = len(params), len(lrs)
    second_moments = max_exp_avg_sqs if amsgrad else exp_avg_sqs
    guard = FoundInfGuard(
        found_inf,
        [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lrs, hypergrads,
         effective_lrs, *([] if log_lr_adam is None else [log_lr_adam.states])],
    )  # fmt: skip
    grads = unscaled_grads(grads, grad_scale)

    # 1. Gradients: training (with L2 decay unless decoupled) and the objective's.
    l2 = 0.0 if decoupled_weight_decay else weight_decay
    grads = decayed_grads(grads, params, l2, maximize, foreach=False)
    objective = _objective(grads, objective_grads, maximize)

    # 2. d_{t-1} from the moments as they stand, then the LR from the full reduction.
    previous = [
        _previous_direction(
            params[i], exp_avgs[i], second_moments[i], state_steps[i],
            effective_lrs[slot_of(i, n, num_slots)], beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled=decoupled_weight_decay,
        )
        if has_previous[i]
        else None
        for i in range(n)
    ]  # fmt: skip
    update_learned_lrs_(
        objective, previous, lrs, hypergrads, effective_lrs, hyper_lr=hyper_lr,
        multiplicative=multiplicative, prev_lr_scale=prev_lr_scale, lr_scale=lr_scale,
        lr_lag=lr_lag, sum_reducer=sum_reducer, log_lr_adam=log_lr_adam,
    )  # fmt: skip
    del previous

    # 3. torch.optim.Adam's moment updates and step with the learned LR.
    for i in range(n):
        state_steps[i].add_(1)
        exp_avgs[i].lerp_(grads[i], 1 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(grads[i], grads[i], value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sqs[i], out=max_exp_avg_sqs[i])
    directions = [
        _adam_direction(exp_avgs[i], second_moments[i], state_steps[i], beta1, beta2, eps)
        for i in range(n)
    ]
    if decoupled_weight_decay and weight_decay != 0:
        for direction, param in zip(directions, params):
            direction.add_(param, alpha=weight_decay)
    apply_steps_(params, directions, effective_lrs)
    guard.restore()


def _objective(grads, objective_grads, maximize):
    if objective_grads is None:
        return grads
    if maximize:
        return torch._foreach_neg(objective_grads)
    return objective_grads


def _foreach_adam_hd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    has_previous: list[bool],
    lrs: list[Tensor],
    hypergrads: list[Tensor],
    effective_lrs: list[Tensor],
    objective_grads: list[Tensor] | None,
    *,
    lr_scale: float,
    prev_lr_scale: float,
    hyper_lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    multiplicative: bool,
    lr_lag: int,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    sum_reducer: SumReducer | None = None,
    log_lr_adam: LogLrAdam | None = None,
) -> None:
    """Adam-HD with list ops: a number of ATen ops per step that does not grow with the number
    of tensors (:mod:`._foreach_hd`); an inf/NaN step is folded into the step, nothing is
    copied."""
    if not params:
        return
    n, num_slots = len(params), len(lrs)
    second_moments = max_exp_avg_sqs if amsgrad else exp_avg_sqs
    skip = skip_fold(found_inf, params, lrs[0].dtype)
    guard = FoundInfGuard(
        found_inf if skip is None else None,
        [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lrs, hypergrads,
         effective_lrs, *([] if log_lr_adam is None else [log_lr_adam.states])],
    )  # fmt: skip
    grads = unscale_(grads, grad_scale)
    l2 = 0.0 if decoupled_weight_decay else weight_decay
    grads = decayed_grads(grads, params, l2, maximize, foreach=True)
    if skip is not None:
        grads = skip.grads(grads)
    objective = _objective(grads, objective_grads, maximize)

    present = [i for i in range(n) if has_previous[i]]
    previous: list[Tensor | None] = [None] * n
    found: list[Tensor] = []
    if present:
        found = _foreach_previous_directions(
            [params[i] for i in present], [exp_avgs[i] for i in present],
            [second_moments[i] for i in present], [state_steps[i] for i in present],
            effective_lrs if num_slots == 1 else [effective_lrs[i] for i in present],
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled=decoupled_weight_decay,
        )  # fmt: skip
        for i, direction in zip(present, found):
            previous[i] = direction
    step_lrs = update_slots_(
        objective, previous, lrs, hypergrads, effective_lrs, hyper_lr=hyper_lr,
        multiplicative=multiplicative, prev_lr_scale=prev_lr_scale, lr_scale=lr_scale,
        lr_lag=lr_lag, sum_reducer=sum_reducer, skip=skip, log_lr_adam=log_lr_adam,
    )  # fmt: skip
    del previous, found

    direction_steps = state_steps
    if skip is None:
        torch._foreach_add_(state_steps, 1)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
    else:
        # The direction of a skipped step is multiplied by an LR of 0; its bias corrections use
        # t + 1 all the same (at t = 0 they would be 0 and the direction 0 / 0).
        direction_steps = torch._foreach_add(state_steps, 1)
        torch._foreach_add_(state_steps, [skip.keep] * n)  # the Tensor overload reads it
        torch._foreach_lerp_(exp_avgs, grads, [skip.value(1 - beta1, 0.0)] * n)
        torch._foreach_mul_(exp_avg_sqs, skip.value(beta2, 1.0))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if amsgrad:
        # On a skipped step v * 0 = 0 leaves the maximum (>= 0) as it is.
        new_max = exp_avg_sqs if skip is None else torch._foreach_mul(exp_avg_sqs, skip.keep)
        torch._foreach_maximum_(max_exp_avg_sqs, new_max)
    directions = _foreach_adam_directions(
        exp_avgs, second_moments, direction_steps, beta1, beta2, eps
    )
    if decoupled_weight_decay and weight_decay != 0:
        torch._foreach_add_(directions, params, alpha=weight_decay)
    foreach_apply_steps_(params, directions, step_lrs)
    guard.restore()


def adam_hd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
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
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    multiplicative: bool,
    lr_lag: int,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    sum_reducer: SumReducer | None = None,
    log_lr_adam: LogLrAdam | None = None,
) -> None:
    """One Adam-HD step over tensors sharing ``lrs`` (one slot, or one per tensor).

    Mutates ``params``, the moments, ``state_steps``, ``lrs`` (learned LRs), ``hypergrads``
    (dE/d eta) and ``effective_lrs`` (``lr_scale * eta`` applied by this step; on entry, the LR
    applied by the previous step, which AdamW's d_{t-1} needs). ``max_exp_avg_sqs`` is used only
    with ``amsgrad``. ``has_previous[i]`` says whether tensor i moved at the previous step.
    AMP: ``grads`` are divided by ``grad_scale`` (GradScaler's g * (1 / S)); when ``found_inf``
    is nonzero the step changes nothing, step counts included. ``sum_reducer``: for the local
    shards of DTensor parameters (FSDP2), sums every rank's partial HD sums (see
    ``hyperlr_ext._common.sharded.sum_reducer``); the fused kernels do not take one.
    """
    impl = choose_implementation(params, foreach=foreach, fused=fused, algorithm="adam_hd")
    func = {
        "single": _single_tensor_adam_hd,
        "foreach": _foreach_adam_hd,
        "fused": _fused_adam_hd,
    }[impl]
    func(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        has_previous,
        lrs,
        hypergrads,
        effective_lrs,
        objective_grads,
        lr_scale=lr_scale,
        prev_lr_scale=prev_lr_scale,
        hyper_lr=hyper_lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad,
        multiplicative=multiplicative,
        lr_lag=lr_lag,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
        sum_reducer=sum_reducer,
        log_lr_adam=log_lr_adam,
    )
