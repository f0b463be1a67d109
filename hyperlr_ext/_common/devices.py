"""Where the hyper-state of a param group lives."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hyper_device_dtype"]


def hyper_device_dtype(params: list[Tensor]) -> tuple[torch.device, torch.dtype]:
    """Where a group's hyper-state (learned LR, tangent scalars, TLR's LR) lives: the params'
    device, float64 when any param is float64, else float32."""
    device = params[0].device if params else torch.device("cpu")
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return device, dtype
