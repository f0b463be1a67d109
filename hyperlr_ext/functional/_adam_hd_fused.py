"""The fused implementation of Adam-HD: the compiled ops of csrc/adam_hd*.{h,cpp} and
csrc/cuda/adam_hd.cu, behind the signature of ``_single_tensor_adam_hd``.

Exact mode (``lr_lag=0``) is two passes: ``adam_hd_moments_`` recomputes d_{t-1} from the moments
before it updates them, reduces <g_hat, d_{t-1}> (and the squared norms) per LR slot and applies
the HD rule on the device; ``adam_hd_param_step_`` then steps with the effective LR it wrote.
``lr_lag=1`` is one pass, ``adam_hd_lagged_step_``, stepping with s_t * eta_{t-1}. The step
counts stay device tensors; nothing here reads a tensor's value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperlr_ext._common.sharded import SumReducer
from hyperlr_ext.functional._fused_common import HdSlots, slot_tensors
from hyperlr_ext.functional._hd_rule import LogLrAdam

__all__ = ["_fused_adam_hd"]


def _fused_adam_hd(
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
    """Adam-HD with the compiled kernels; same signature and results as the reference."""
    if sum_reducer is not None:
        raise ValueError(
            "the fused kernels take whole tensors, not shards with a sum_reducer (DTensor/FSDP2 "
            "param groups step on the pure-PyTorch path)"
        )
    if not params:
        return
    # A skipped step does not count (as in torch's fused Adam). One op on the counts when they
    # are views of one tensor (as AdamHD creates them), else one per count and a stack.
    ((steps, separate),) = slot_tensors(state_steps)
    if separate:
        torch._foreach_add_(state_steps, 1)
        if found_inf is not None:
            torch._foreach_sub_(state_steps, [found_inf.reshape(())] * len(state_steps))
        steps = torch.stack(state_steps)
    else:
        steps.add_(1)
        if found_inf is not None:
            steps.sub_(found_inf.reshape(()))
    flags = [1 if f else 0 for f in has_previous]
    objective = list(objective_grads) if objective_grads is not None else []
    max_sqs = list(max_exp_avg_sqs) if amsgrad else []
    slots = HdSlots(lrs, hypergrads, effective_lrs, log_lr_adam)
    ops = torch.ops.hyperlr_ext
    step = ops.adam_hd_lagged_step_ if lr_lag else ops.adam_hd_moments_
    step(
        params, grads, objective, exp_avgs, exp_avg_sqs, max_sqs, steps, flags,
        slots.lrs, slots.hypergrads, slots.effective_lrs, lr_scale, prev_lr_scale, hyper_lr,
        beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
        multiplicative, grad_scale, found_inf, slots.hyper_state, slots.hyper_adam,
    )  # fmt: skip
    if not lr_lag:
        ops.adam_hd_param_step_(
            params, exp_avgs, max_sqs if amsgrad else exp_avg_sqs, steps, slots.effective_lrs,
            beta1, beta2, eps, weight_decay, decoupled_weight_decay, found_inf,
        )  # fmt: skip
    slots.copy_back()
