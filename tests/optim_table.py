"""The optimizer table, in the style of PyTorch's OptimizerInfo: one row per optimizer class with
its sample configurations. Generic tests iterate the rows; a new optimizer gets the whole suite by
adding a row."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

import hyperlr_ext as hx


@dataclass(frozen=True)
class OptimizerRow:
    cls: type
    configs: list[dict[str, Any]]
    # torch.optim class and the kwargs mapping used to reproduce the trajectory with hyper_lr=0
    torch_equivalents: list[tuple[type, dict[str, Any]]] = field(default_factory=list)
    # invalid constructor arguments: (kwargs, argument name the message must contain)
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    # whether fused=True has kernels (csrc/) for this optimizer
    fused: bool = False

    @property
    def name(self) -> str:
        return self.cls.__name__


COMMON_INVALID = [
    (dict(lr=-1.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=torch.tensor(0.1)), "lr"),
    (dict(hyper_lr=-1e-3), "hyper_lr"),
    (dict(hyper_lr=float("inf")), "hyper_lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(lr_lag=2), "lr_lag"),
    (dict(lr_lag=True), "lr_lag"),
    (dict(multiplicative="yes"), "multiplicative"),
    (dict(per_tensor=1), "per_tensor"),
    (dict(maximize=None), "maximize"),
    (dict(foreach="yes"), "foreach"),
    (dict(differentiable=True), "differentiable"),
    (dict(hyper_optimizer="lbfgs"), "hyper_optimizer"),
    (dict(hyper_optimizer="adam", multiplicative=True), "multiplicative"),
    (dict(hyper_betas=(0.9, 0.99)), "hyper_betas"),
    (dict(lr_bounds=(1e-6, 1.0)), "lr_bounds"),
    (dict(hyper_optimizer="adam", hyper_betas=(0.9, 1.0)), "hyper_betas"),
    (dict(hyper_optimizer="adam", hyper_eps=0.0), "hyper_eps"),
    (dict(hyper_optimizer="adam", lr_bounds=(0.0, 1.0)), "lr_bounds"),
    (dict(hyper_optimizer="adam", lr_bounds=(1.0, 0.1)), "lr_bounds"),
    (dict(hyper_optimizer="adam", lr=100.0), "lr_bounds"),
]

SGD_ROW = OptimizerRow(
    cls=hx.SGDHD,
    configs=[
        dict(lr=0.05, hyper_lr=0.01),
        dict(lr=0.05, hyper_lr=0.01, momentum=0.9, weight_decay=0.01),
        dict(lr=0.05, hyper_lr=0.01, momentum=0.9, nesterov=True, per_tensor=True),
        dict(lr=0.05, hyper_lr=0.1, multiplicative=True, momentum=0.5, dampening=0.2),
        dict(lr=0.05, hyper_lr=0.01, momentum=0.9, lr_lag=1, maximize=True),
        dict(lr=0.05, hyper_optimizer="adam", hyper_lr=0.1, momentum=0.9, per_tensor=True),
    ],
    torch_equivalents=[
        (torch.optim.SGD, dict(lr=0.05)),
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.02)),
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02)),
        (torch.optim.SGD, dict(lr=0.05, weight_decay=0.1, maximize=True)),
        (torch.optim.SGD, dict(lr=0.05, momentum=0.7, maximize=True, nesterov=True)),
    ],
    invalid=COMMON_INVALID
    + [
        (dict(momentum=-0.5), "momentum"),
        (dict(dampening=1.5), "dampening"),
        (dict(nesterov=True, momentum=0.0), "Nesterov"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
    ],
    fused=True,
)

ADAM_ROW = OptimizerRow(
    cls=hx.AdamHD,
    configs=[
        dict(lr=0.01, hyper_lr=1e-3),
        dict(lr=0.01, hyper_lr=1e-3, weight_decay=0.01, amsgrad=True),
        dict(
            lr=0.01, hyper_lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True, per_tensor=True
        ),
        dict(lr=0.01, hyper_lr=0.1, multiplicative=True, lr_lag=1),
        dict(lr=0.01, hyper_lr=1e-3, maximize=True, betas=(0.8, 0.9)),
        dict(lr=0.01, hyper_optimizer="adam", hyper_lr=0.1, weight_decay=0.01),
    ],
    torch_equivalents=[
        (torch.optim.Adam, dict(lr=0.01)),
        (torch.optim.Adam, dict(lr=0.01, weight_decay=0.05, amsgrad=True)),
        (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, maximize=True)),
        (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
        (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05, amsgrad=True)),
    ],
    invalid=COMMON_INVALID
    + [
        (dict(betas=(1.0, 0.999)), "beta"),
        (dict(betas=(0.9, -0.1)), "beta"),
        (dict(betas=0.9), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(amsgrad=None), "amsgrad"),
        (dict(decoupled_weight_decay=1), "decoupled_weight_decay"),
    ],
    fused=True,
)

ROWS = [SGD_ROW, ADAM_ROW]
ROW_CONFIGS = [(row, cfg) for row in ROWS for cfg in row.configs]
ROW_CONFIG_IDS = [f"{row.name}-{i}" for row in ROWS for i, _ in enumerate(row.configs)]
# The implementations every row runs: the for-loop, foreach, and fused where the row has kernels.
IMPLS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def skip_unless_impl(row: OptimizerRow, impl: str) -> None:
    import pytest

    from hyperlr_ext import _ops

    if impl == "fused" and not row.fused:
        pytest.skip(f"{row.name} has no fused kernels")
    if impl == "fused" and not _ops.EXTENSION_AVAILABLE:
        pytest.skip(f"compiled extension unavailable: {_ops.EXTENSION_ERROR}")


def make_model(dtype=torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(
        dtype
    )


def train(model, opt, steps: int, seed: int = 0, **step_kwargs) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64).to(dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step(**step_kwargs)


def materialise_in_place(model: torch.nn.Module, device: str = "cpu") -> None:
    """``model.to_empty(device)`` keeping the Parameter objects (an optimizer built on the meta
    parameters holds them): to_empty swaps the tensors in only with this torch.__future__ flag."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def list_ops_on_cpu():
    """The foreach paths take the branch they take on a GPU (constant-launch list ops) on CPU
    tensors too (hyperlr_ext/functional/_foreach_hd.py, LIST_OP_DEVICES)."""
    from hyperlr_ext.functional._foreach_hd import list_ops_on

    return list_ops_on("cpu")


def gpu_branch(func):
    """``func`` run under :func:`list_ops_on_cpu` (same signature)."""

    @functools.wraps(func)
    def run(*args, **kwargs):
        with list_ops_on_cpu():
            return func(*args, **kwargs)

    return run
