"""Argument checks shared by the optimizer constructors: each failure names the argument and
the accepted range, and begins like torch.optim's message for the same case where one exists."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

FLOAT32_MAX = 3.4028234663852886e38

__all__ = [
    "check_bool",
    "check_choice",
    "check_number",
    "check_optional_bool",
    "check_tensor_lr",
]


def check_number(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float = math.inf,
    high_inclusive: bool = False,
    label: str | None = None,
) -> float:
    """Return ``value`` as a float if it is a real number in [low, high) (or [low, high]).

    The message starts as torch.optim's does (``label`` defaults to ``"<name> value"``, so
    ``Invalid weight_decay value: -1``; pass ``"learning rate"`` for ``Invalid learning rate: -1``)
    and goes on to name the argument and the accepted range.
    """
    prefix = f"Invalid {label or name + ' value'}: {value}"
    closing = "]" if high_inclusive else ")"
    accepted = f"{name} must be a finite number in [{low}, {high}{closing}"
    if isinstance(value, Tensor):
        raise ValueError(
            f"{prefix}; {accepted}. {name} as a Tensor is not supported: pass a Python float"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{prefix}; {accepted}, got type {type(value).__name__}")
    value = float(value)
    above = value > high if high_inclusive else value >= high
    if not math.isfinite(value) or value < low or above:
        raise ValueError(f"{prefix}; {accepted}")
    if abs(value) > FLOAT32_MAX:  # the learned state is float32 for float32 parameters
        raise ValueError(
            f"{prefix}; {accepted} and within float32's range (|x| <= {FLOAT32_MAX:g})"
        )
    return value


def check_tensor_lr(lr: Any, *, foreach: bool | None, capturable: bool) -> None:
    """Refuse a Tensor ``lr`` with torch.optim's wording: the learned LR is already a device
    tensor, and ``group["lr"]`` must stay the float that schedulers scale it by."""
    if not isinstance(lr, Tensor):
        return
    if lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    where = " for capturable=False and foreach=True" if foreach and not capturable else ""
    raise ValueError(
        f"lr as a Tensor is not supported{where} by hyperlr_ext optimizers: they learn the LR "
        f"as a device tensor themselves; pass lr as a Python float"
    )


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be True or False")
    return value


def check_optional_bool(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be None, True or False")
    return value


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be one of {choices}")
    return value
