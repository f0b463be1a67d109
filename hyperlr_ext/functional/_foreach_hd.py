"""The list-op building blocks of the foreach HD paths: on a GPU a step issues a number of ATen
ops that does not depend on the number of tensors (each op is one or a few kernel launches).
On the CPU (:data:`LIST_OP_DEVICES`) the sums and the step run per tensor instead, without
temporaries the size of the parameters.

- :func:`slot_sums`: <g_hat, d_{t-1}> (and the squared norms) per LR slot. One slot: the tensors
  are concatenated once and reduced by one ``dot``; one slot per tensor: the per-tensor sums of
  the products by two L1 norms, sum(p) = |p|_1 - 2 |min(p, 0)|_1 (torch has no signed
  per-tensor sum over a list), whose rounding error is bounded by the same eps * sum(|p|) as any
  float summation.
- :func:`update_slots_`: the HD rule on the 1-D slot tensors, one op per line for every slot.
- :class:`SkipFold`: an inf/NaN step (AMP's ``found_inf``) folded into the step itself: the
  gradients are replaced by -0.0 on the device, every decay factor becomes 1 and every LR 0, so
  the step writes what was there; nothing is copied beforehand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from hyperlr_ext._common.sharded import SumReducer
from hyperlr_ext.functional import _hd_rule
from hyperlr_ext.functional._fused_common import copy_back_slots, slot_tensors
from hyperlr_ext.functional._hd_rule import LogLrAdam, hd_rule_

# Devices on which a kernel launch costs more than a pass over a tensor (GPUs): there the foreach
# paths reduce and step with list ops whose number does not grow with the number of tensors, at
# the price of temporaries the size of the gradients (a concatenation, or the products). On the
# CPU, whose list ops are loops anyway, the sums are per-tensor dots and the step an in-place
# multiply-add per tensor: no temporaries. benchmarks/op_counts.py adds "cpu" to count the GPU
# path on CPU tensors.
LIST_OP_DEVICES: set[str] = {"cuda", "xpu", "mps", torch._C._get_privateuse1_backend_name()}


def launch_bound(device: torch.device) -> bool:
    """Whether the foreach paths use their constant-launch list ops on ``device``."""
    return device.type in LIST_OP_DEVICES


@contextlib.contextmanager
def list_ops_on(device_type: str) -> Iterator[None]:
    """Within the block the foreach paths take their GPU branch on ``device_type`` too (for
    counting a GPU's ops, and testing that branch, on CPU tensors)."""
    added = device_type not in LIST_OP_DEVICES
    LIST_OP_DEVICES.add(device_type)
    try:
        yield
    finally:
        if added:
            LIST_OP_DEVICES.discard(device_type)


__all__ = [
    "LIST_OP_DEVICES",
    "SkipFold",
    "apply_steps_",
    "flat_dot",
    "launch_bound",
    "list_ops_on",
    "skip_fold",
    "slot_sums",
    "unscale_",
    "update_slots_",
]


def _flat(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat if flat.dtype == dtype else flat.to(dtype)


def flat_dot(a: list[Tensor], b: list[Tensor], dtype: torch.dtype) -> Tensor:
    """sum_i <a_i, b_i> accumulated in ``dtype``: one concatenation per list and one dot where
    launches are dear (:func:`launch_bound`), else a dot per tensor."""
    if not a:
        return torch.zeros((), dtype=dtype)
    if not launch_bound(a[0].device):
        return torch.stack(_hd_rule.tensor_dots(a, b, dtype)).sum()
    return torch.dot(_flat(a, dtype), _flat(b, dtype))


def _signed_sums(products: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Per-tensor sum of every list element: |p|_1 - 2 |min(p, 0)|_1, accumulated in ``dtype``."""
    negative = torch._foreach_clamp_max(products, 0.0)
    total = torch._foreach_norm(products, 1, dtype=dtype)
    return torch._foreach_add(total, torch._foreach_norm(negative, 1, dtype=dtype), alpha=-2)


def _sq_norms(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    if hasattr(torch, "_foreach_powsum"):
        return torch._foreach_powsum(tensors, 2, dtype=dtype)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch._foreach_mul(norms, norms)


def _per_slot(values: list[Tensor], present: list[int], num_slots: int, zero: Tensor) -> Tensor:
    """A 1-D tensor of ``num_slots``: values[k] at slot present[k], 0 elsewhere (one stack)."""
    by_slot = [zero] * num_slots
    for k, slot in enumerate(present):
        by_slot[slot] = values[k]
    return torch.stack(by_slot)


def slot_sums(
    objective: list[Tensor],
    previous: list[Tensor | None],
    num_slots: int,
    acc_dtype: torch.dtype,
    norms: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per LR slot (1-D tensors of ``num_slots``): <g_hat, d_{t-1}>, and with ``norms`` |g_hat|^2
    and |d_{t-1}|^2; a ``None`` in ``previous`` adds nothing. Accumulated in ``acc_dtype``."""
    device = objective[0].device
    if not launch_bound(device):
        return _per_tensor_slot_sums(objective, previous, num_slots, acc_dtype, norms)
    present = [i for i, d in enumerate(previous) if d is not None]
    prev = [previous[i] for i in present]
    obj = [objective[i] for i in present]
    if num_slots == 1:
        if not present:
            zero = torch.zeros(1, dtype=acc_dtype, device=device)
            if not norms:
                return zero, None, None
            flat_obj = _flat(objective, acc_dtype)
            return zero, torch.dot(flat_obj, flat_obj).view(1), zero
        flat_obj, flat_prev = _flat(obj, acc_dtype), _flat(prev, acc_dtype)
        dot = torch.dot(flat_obj, flat_prev).view(1)
        if not norms:
            return dot, None, None
        all_obj = flat_obj if len(present) == len(objective) else _flat(objective, acc_dtype)
        return dot, torch.dot(all_obj, all_obj).view(1), torch.dot(flat_prev, flat_prev).view(1)
    if not present:
        zeros = torch.zeros(num_slots, dtype=acc_dtype, device=device)
        grad_sq = torch.stack(_sq_norms(objective, acc_dtype)) if norms else None
        return zeros, grad_sq, zeros if norms else None
    zero = torch.zeros((), dtype=acc_dtype, device=device)
    products = torch._foreach_mul(obj, prev)
    dots = _per_slot(_signed_sums(products, acc_dtype), present, num_slots, zero)
    if not norms:
        return dots, None, None
    grad_sq = torch.stack(_sq_norms(objective, acc_dtype))
    return dots, grad_sq, _per_slot(_sq_norms(prev, acc_dtype), present, num_slots, zero)


def _per_tensor_slot_sums(objective, previous, num_slots, acc_dtype, norms):
    """:func:`slot_sums` with a dot per tensor (the for-loop reference's sums), as 1-D tensors."""
    sums = _hd_rule.slot_sums_per_tensor(objective, previous, num_slots, acc_dtype, norms)
    return tuple(None if s is None else torch.stack(s) for s in sums)


class SkipFold:
    """AMP's ``found_inf`` (nonzero: skip the step) as device scalars the step multiplies by.

    ``grads`` gives the (decayed) gradients with every element -0.0 on a skipped step (-0.0
    adds nothing: x + -0.0 == x for every x, zeros included); ``value(v, skipped)`` is v, or
    ``skipped`` on a skipped step; ``keep`` is 1, or 0 on a skipped step. Exact for
    float32/float64 state (the factors are held in its precision); :func:`skip_fold` falls back
    to copies otherwise. A parameter holding -0.0 whose direction is negative comes back as
    +0.0 (p - (d * 0) with d < 0 is p + 0.0); every other value keeps its bits.
    """

    def __init__(self, found_inf: Tensor, dtype: torch.dtype) -> None:
        self.skip = found_inf.reshape(()).to(dtype).ne(0)
        self.dtype = dtype
        self.keep = (~self.skip).to(dtype)
        self._neg_zero = torch.full((), -0.0, dtype=dtype, device=self.skip.device)

    def grads(self, grads: list[Tensor]) -> list[Tensor]:
        # One select per tensor: torch has no list op that replaces a NaN (NaN * 0 is NaN).
        return [torch.where(self.skip, self._neg_zero, g) for g in grads]

    def value(self, value: float, skipped: float) -> Tensor:
        """``value`` as a 0-dim tensor of the state's dtype, or ``skipped`` on a skipped step."""
        full = torch.full((), value, dtype=self.dtype, device=self.skip.device)
        return torch.where(self.skip, skipped, full)

    def select_(self, targets: list[Tensor], values: list[Tensor]) -> None:
        """targets[i] = values[i], or unchanged on a skipped step."""
        for target, value in zip(targets, values):
            torch.where(self.skip, target, value, out=target)

    def restore_(self, targets: list[Tensor], saved: list[Tensor]) -> None:
        """targets[i] = saved[i] on a skipped step, else unchanged."""
        for target, old in zip(targets, saved):
            torch.where(self.skip, old, target, out=target)


def skip_fold(found_inf: Tensor | None, params: list[Tensor], lr_dtype: torch.dtype):
    """A :class:`SkipFold` when ``found_inf`` is given and every param has the LR's dtype (so the
    folded factors are exact), else None (no flag, or low-precision params: the caller then
    snapshots with ``FoundInfGuard``)."""
    if found_inf is None or any(p.dtype != lr_dtype for p in params):
        return None
    return SkipFold(found_inf, lr_dtype)


def unscale_(grads: list[Tensor], grad_scale: Tensor | None) -> list[Tensor]:
    """GradScaler's g * (1 / S) for the whole list in one op (new tensors)."""
    if grad_scale is None:
        return grads
    return torch._foreach_mul(grads, grad_scale.reciprocal().reshape(()))


def update_slots_(
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
    skip: SkipFold | None = None,
    log_lr_adam: LogLrAdam | None = None,
) -> list[Tensor]:
    """``update_learned_lrs_`` of :mod:`._hd_rule` with list ops: the same arguments, the sums of
    :func:`slot_sums`, the rule on the slots' 1-D tensors. Returns the LRs the step applies:
    ``effective_lrs``, or with ``skip`` their values times ``skip.keep`` (0 on a skipped step,
    when the slots keep their values)."""
    slot_lists = (lrs, hypergrads, effective_lrs)
    if log_lr_adam is not None:
        slot_lists += (log_lr_adam.states,)
    slots = slot_tensors(*slot_lists)
    lr, hypergrad, effective = (t for t, _ in slots[:3])
    adam = None if log_lr_adam is None else replace(log_lr_adam, states=[slots[3][0]])
    mutated = [t for t, _ in slots]
    saved = [t.clone() for t in mutated] if skip is not None else None
    applied = lr.clone() if lr_lag else lr
    sums = slot_sums(objective, previous, lr.numel(), lr.dtype, multiplicative or adam is not None)
    dots, grad_sq, dir_sq = _hd_rule.reduce_sums(
        *(None if s is None else [s] for s in sums), sum_reducer
    )
    hd_rule_([lr], [hypergrad], dots, grad_sq, dir_sq, hyper_lr=hyper_lr,
             multiplicative=multiplicative, prev_lr_scale=prev_lr_scale,
             log_lr_adam=adam)  # fmt: skip
    torch.mul(applied, lr_scale, out=effective)
    if skip is not None:
        skip.restore_(mutated, saved)
    copy_back_slots(slot_lists, slots)
    if skip is None:
        return effective_lrs
    masked = effective * skip.keep
    return [masked.view(())] if len(effective_lrs) == 1 else list(masked.unbind(0))


def apply_steps_(params: list[Tensor], directions: list[Tensor], steps: list[Tensor]) -> None:
    """``param -= step * direction`` for every tensor with two list ops (one per tensor off
    :func:`launch_bound` devices); ``steps`` has one LR or one per tensor. Parameters in another
    dtype than the LR (bf16/fp16) are updated from the LR's precision and rounded once, one
    tensor at a time."""
    if not params:
        return
    if not launch_bound(params[0].device):
        _hd_rule.apply_steps_(params, directions, steps)
        return
    per_tensor = steps if len(steps) == len(params) else steps * len(params)
    if any(p.dtype != s.dtype for p, s in zip(params, per_tensor)):
        for param, direction, step in zip(params, directions, per_tensor):
            param.copy_(param.to(step.dtype) - direction.to(step.dtype) * step)
        return
    scaled = (
        torch._foreach_mul(directions, steps[0])
        if len(steps) == 1
        else torch._foreach_mul(directions, per_tensor)
    )
    torch._foreach_sub_(params, scaled)
