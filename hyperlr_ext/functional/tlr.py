"""TLR, the Newton-based trainable LR (Retsinas et al.): the window end of docs/design.md, TLR.

Every K optimizer steps, per param group: u_k = (w_snapshot - w) / eta (the window's mean update
direction, whatever the optimizer), num = <u_{k-1}, u_k>, den = |u_{k-1}|^2 - num, and, when
den > 0, eta <- eta * min(1 + gamma * num / den, max_factor). ``tlr_window_`` forms u, the two
sums and the new snapshot in one pass (the reference below, or the compiled op of csrc/tlr*.
{h,cpp} and csrc/cuda/tlr.cu with the same signature); ``tlr_rule_`` applies the Newton step on
the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fused_tlr_window_", "tlr_rule_", "tlr_window_"]


def tlr_window_(
    params: list[Tensor],
    snapshots: list[Tensor],
    prev_updates: list[Tensor],
    lr: Tensor,
    *,
    has_previous: bool,
) -> Tensor:
    """u = (snapshot - w) / lr for every tensor; returns [<u_prev, u>, |u_prev|^2] (0 without a
    previous window) as a 1-D tensor of ``lr``'s dtype and device, and writes snapshot <- w and
    u_prev <- u in place. Math in ``lr``'s dtype (float32, float64 for float64 params)."""
    acc = lr.dtype
    dot = torch.zeros((), dtype=acc, device=lr.device)
    prev_sq = torch.zeros((), dtype=acc, device=lr.device)
    for w, snapshot, prev in zip(params, snapshots, prev_updates):
        update = (snapshot.to(acc) - w.detach().to(acc)) / lr
        if has_previous:
            previous = prev.to(acc)
            dot = dot + torch.dot(previous.reshape(-1), update.reshape(-1))
            prev_sq = prev_sq + torch.dot(previous.reshape(-1), previous.reshape(-1))
        snapshot.copy_(w.detach())
        prev.copy_(update)
    return torch.stack([dot, prev_sq])


def fused_tlr_window_(
    params: list[Tensor],
    snapshots: list[Tensor],
    prev_updates: list[Tensor],
    lr: Tensor,
    *,
    has_previous: bool,
) -> Tensor:
    """``tlr_window_`` by the compiled one-pass kernel (same arguments, same results up to the
    order of the sums)."""
    return torch.ops.hyperlr_ext.tlr_window_(
        [p.detach() for p in params], snapshots, prev_updates, lr, has_previous
    )


def tlr_rule_(lr: Tensor, sums: Tensor, *, gamma: float, max_factor: float) -> None:
    """eta <- eta * min(1 + gamma * num / den, max_factor) where den = |u_prev|^2 - num > 0, else
    unchanged; in place, on the device (no value is read). For gamma in (0, 1] and den > 0 the
    factor is above 1 - gamma >= 0 (num / den > -1), so eta stays >= 0."""
    num = sums[0]
    den = sums[1] - num
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    factor = (1.0 + gamma * num / safe_den).clamp(max=max_factor)
    lr.copy_(torch.where(den > 0, lr * factor, lr))
