"""Callbacks that log what the optimizers learn to the frameworks people train with.

Optional extras, imported lazily: ``hyperlr_ext.integrations.transformers`` needs
``transformers`` and ``hyperlr_ext.integrations.lightning`` needs ``lightning``; importing this
package needs neither.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["learned_values"]

# Group keys, if present, and the names they are logged under.
_KEYS = (("effective_lr", "effective_lr"), ("hypergrad", "hypergrad"), ("learned_mu", "mu"),
         ("adapted_hyper_lr", "hyper_lr"))  # fmt: skip


def learned_values(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"effective_lr/group0": ..., "hypergrad/group0": ..., "mu/group0": ...}`` for every group
    that has them (HD optimizers, MARTHE/RTHO, an optimizer wrapped by ``HyperLR``); a torch
    optimizer scheduled by TLR or MLR-SNet logs its ``lr``. Reads the device tensors: call it
    where logging may synchronise."""
    from hyperlr_ext.optim.hyper_lr import HyperLR

    out: dict[str, float] = {}
    hyper = HyperLR.attached(optimizer)
    if hyper is not None:
        for i, (effective, hypergrad) in enumerate(zip(hyper.effective_lr, hyper.hypergrad)):
            out[f"effective_lr/group{i}"] = float(effective.detach().float().mean())
            out[f"hypergrad/group{i}"] = float(hypergrad.detach().float().mean())
        return out
    for i, group in enumerate(optimizer.param_groups):
        found = False
        for key, name in _KEYS:
            value = group.get(key)
            if isinstance(value, torch.Tensor):
                out[f"{name}/group{i}"] = float(value.detach().float().mean())
                found = True
        if not found:
            out[f"lr/group{i}"] = float(group["lr"])
    return out


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (accelerate's AcceleratedOptimizer, ...)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer
