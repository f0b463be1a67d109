"""The fused implementation of SGD-HD: the compiled ops of csrc/sgd_hd*.{h,cpp} and
csrc/cuda/sgd_hd.cu, behind the signature of ``_single_tensor_sgd_hd``.

Exact mode (``lr_lag=0``) is two passes (docs/design.md, "Kernel byte budgets"):
``sgd_hd_direction_`` reduces <g_hat, d_{t-1}> (and the squared norms) per LR slot, writes d_t
(the momentum buffer and/or the kept direction) and applies the HD rule on the device, then
``sgd_hd_param_step_`` computes
w - lr * d_t with the effective LR it wrote. ``lr_lag=1`` is one pass, ``sgd_hd_lagged_step_``:
the step uses s_t * eta_{t-1} and the same pass reduces the sums for eta_t.
The LR never leaves the device; nothing here reads a tensor's value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperlr_ext._common.sharded import SumReducer
from hyperlr_ext.functional._fused_common import HdSlots
from hyperlr_ext.functional._hd_rule import LogLrAdam

__all__ = ["_fused_sgd_hd"]


def _created(tensors: list[Tensor | None], params: list[Tensor]) -> list[Tensor]:
    """Fills the missing entries of ``tensors`` (in place) with zero-filled buffers.

    The kernels overwrite them (their flags say they hold nothing yet); zeros matter only when AMP
    skips the step: the buffer then holds 0, as the reference path leaves it.
    """
    for i, t in enumerate(tensors):
        if t is None:
            tensors[i] = torch.zeros_like(params[i], memory_format=torch.preserve_format)
    return tensors


def _fused_sgd_hd(
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
    """SGD-HD with the compiled kernels; same signature and results as the reference."""
    if sum_reducer is not None:
        raise ValueError(
            "the fused kernels take whole tensors, not shards with a sum_reducer (DTensor/FSDP2 "
            "param groups step on the pure-PyTorch path)"
        )
    if not params:
        return
    has_buffer = [int(b is not None) for b in momentum_buffers]
    buffers = _created(momentum_buffers, params) if momentum != 0 else []
    keeps_direction = momentum == 0 or nesterov
    directions = _created(prev_directions, params) if keeps_direction else []
    flags = [int(bool(f)) for f in has_previous]
    objective = list(objective_grads) if objective_grads is not None else []

    slots = HdSlots(lrs, hypergrads, effective_lrs, log_lr_adam)
    ops = torch.ops.hyperlr_ext
    step = ops.sgd_hd_lagged_step_ if lr_lag else ops.sgd_hd_direction_
    step(
        params, grads, objective, buffers, directions, flags, has_buffer,
        slots.lrs, slots.hypergrads, slots.effective_lrs, lr_scale, prev_lr_scale, hyper_lr,
        weight_decay, momentum, dampening, nesterov, maximize, multiplicative,
        grad_scale, found_inf, slots.hyper_state, slots.hyper_adam,
    )  # fmt: skip
    if not lr_lag:
        new_directions = buffers if momentum != 0 and not nesterov else directions
        ops.sgd_hd_param_step_(params, new_directions, slots.effective_lrs, found_inf)
    slots.copy_back()
