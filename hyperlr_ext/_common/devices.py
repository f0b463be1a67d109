"""Where the hyper-state of a param group lives."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hyper_device_dtype", "placed_like_params"]


def hyper_device_dtype(params: list[Tensor]) -> tuple[torch.device, torch.dtype]:
    """Where a group's hyper-state (learned LR, tangent scalars, TLR's LR) lives: the params'
    device, float64 when any param is float64, else float32."""
    device = params[0].device if params else torch.device("cpu")
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return device, dtype


def placed_like_params(
    value: Tensor, device: torch.device, dtype: torch.dtype, initial: float
) -> Tensor:
    """A hyper-state tensor on the params' ``device`` in ``dtype``. One created while the params
    were on the ``meta`` device (a model built there for deferred initialisation, then
    materialised with ``to_empty``) holds no value: it starts again from ``initial``."""
    if value.is_meta and device.type != "meta":
        return torch.full(value.shape, float(initial), dtype=dtype, device=device)
    if value.device != device or value.dtype != dtype:
        return value.to(device=device, dtype=dtype)
    return value
