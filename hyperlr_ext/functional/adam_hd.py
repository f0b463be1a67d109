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
from hyperlr_ext.functional._hd_rule import (
    FoundInfGuard,
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
        direction = (direction + weight_decay * param) / (1 - weight_decay * applied_lr)
    return direction


def _adam_hd_impl(
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
    foreach: bool,
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
) -> None:
    if not params:
        return
    n, num_slots = len(params), len(lrs)
    second_moments = max_exp_avg_sqs if amsgrad else exp_avg_sqs
    guard = FoundInfGuard(
        found_inf,
        [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lrs, hypergrads,
         effective_lrs],
    )  # fmt: skip
    grads = unscaled_grads(grads, grad_scale)

    # 1. Gradients: training (with L2 decay unless decoupled) and the objective's.
    l2 = 0.0 if decoupled_weight_decay else weight_decay
    grads = decayed_grads(grads, params, l2, maximize, foreach)
    if objective_grads is None:
        objective = grads
    else:
        objective = [torch.neg(g) if maximize else g for g in objective_grads]

    # 2. d_{t-1} from the moments as they stand, then the LR from the full reduction.
    previous = [
        _previous_direction(
            params[i],
            exp_avgs[i],
            second_moments[i],
            state_steps[i],
            effective_lrs[slot_of(i, n, num_slots)],
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled=decoupled_weight_decay,
        )
        if has_previous[i]
        else None
        for i in range(n)
    ]
    update_learned_lrs_(
        objective,
        previous,
        lrs,
        hypergrads,
        effective_lrs,
        hyper_lr=hyper_lr,
        multiplicative=multiplicative,
        prev_lr_scale=prev_lr_scale,
        lr_scale=lr_scale,
        lr_lag=lr_lag,
        sum_reducer=sum_reducer,
    )
    del previous

    # 3. torch.optim.Adam's moment updates and step with the learned LR.
    if foreach:
        torch._foreach_add_(state_steps, 1)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        if amsgrad:
            torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
    else:
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
        if foreach:
            torch._foreach_add_(directions, params, alpha=weight_decay)
        else:
            for direction, param in zip(directions, params):
                direction.add_(param, alpha=weight_decay)
    apply_steps_(params, directions, effective_lrs, foreach=foreach)
    guard.restore()


def _single_tensor_adam_hd(*args, **kwargs) -> None:
    """For-loop Adam-HD (the readable reference); same signature as :func:`_foreach_adam_hd`."""
    _adam_hd_impl(*args, foreach=False, **kwargs)


def _foreach_adam_hd(*args, **kwargs) -> None:
    """Adam-HD with the moment updates and the step as ``torch._foreach_*`` calls."""
    _adam_hd_impl(*args, foreach=True, **kwargs)


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
    )
