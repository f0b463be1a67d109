"""The paper's selection of MARTHE/RTHO's hyper-LR: from a high value down by a constant factor
until a short run does not diverge (``MARTHE.find_hyper_lr``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from hyperlr_ext._common.checks import check_choice, check_number

__all__ = ["find_hyper_lr"]


def find_hyper_lr(
    cls: type,
    params: Iterable[Tensor],
    closure: Callable[[], Tensor],
    *,
    steps: int = 100,
    start: float = 1.0,
    factor: float = 10.0,
    smallest: float = 1e-12,
    argument: str = "hyper_lr",
    divergence_ratio: float = 2.0,
    val_closure: Callable[[], Tensor] | None = None,
    buffers: Iterable[Tensor] = (),
    **kwargs: Any,
) -> float:
    """The paper's selection of the hyper-LR (end of its section 4): start high and divide by
    ``factor`` until a short run of ``steps`` steps does not diverge; return that value.

    ``params`` and ``buffers`` (pass ``model.buffers()`` when the closure updates some, as
    BatchNorm's running statistics in training mode) are restored after every trial (the call
    leaves them as it found them);
    ``closure``/``val_closure`` are those of :meth:`step` (let the closure draw a new batch at
    each call). ``argument`` is the value searched: ``"hyper_lr"`` (beta, fixed or initial)
    or ``"hyper_hyper_lr"`` (beta', for MARTHE with adaptive beta and ``hyper_lr=0``).
    ``kwargs`` go to the constructor. A run diverges when a loss is not finite, or when the
    mean loss of its last tenth exceeds ``divergence_ratio`` times the first loss. Outside
    ``step()``, so it reads losses on the host. Raises RuntimeError when every value down to
    ``smallest`` diverges.
    """
    params = list(params)
    check_choice("argument", argument, ("hyper_lr", "hyper_hyper_lr"))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_number("start", start, low=0.0)
    check_number("smallest", smallest, low=0.0)
    check_number("factor", factor, low=1.0)
    check_number("divergence_ratio", divergence_ratio, low=1.0)
    if factor == 1.0 or not (0 < smallest <= start):
        raise ValueError("find_hyper_lr needs factor > 1 and 0 < smallest <= start")
    restored = params + list(buffers)
    saved = [t.detach().clone() for t in restored]
    value = start
    try:
        while value >= smallest:
            opt = cls(params, **{argument: value}, **kwargs)
            losses = []
            for _ in range(steps):
                losses.append(opt.step(closure, val_closure=val_closure))
                if not torch.isfinite(losses[-1]):
                    break
            with torch.no_grad():
                for t, s in zip(restored, saved):
                    t.copy_(s)
            history = torch.stack(losses).double()
            tail = history[-max(1, steps // 10) :]
            finite = len(losses) == steps and bool(torch.isfinite(history).all())
            if finite and float(tail.mean()) <= divergence_ratio * float(history[0]):
                return value
            value /= factor
    finally:
        with torch.no_grad():
            for t, s in zip(restored, saved):
                t.copy_(s)
    raise RuntimeError(
        f"find_hyper_lr: every {argument} from {start} down to {smallest} diverged within "
        f"{steps} steps; lower start or smallest, or check the closure"
    )
