"""The hyper-optimizer of the LR learners (``SGDHD``, ``AdamHD``, ``HyperLR``): how the learned
LR follows its hypergradient.

- ``"sgd"`` (the default): the papers' rules, additive or multiplicative, with step ``hyper_lr``.
- ``"adam"``: an Adam step on log eta from the hypergradient of log eta, eta * dE/d eta
  (hyperlr_ext/functional/_hd_rule.py, ``log_lr_adam_``), with eta kept in ``lr_bounds``. Its
  hyper-arguments default to the robust preset, :data:`ROBUST_PRESET`.

The Adam state of every LR slot, (m, v, beta1^n, beta2^n), lives in the param group as
``group["hyper_adam_state"]`` (the learned LR's shape plus an axis of 4), on the device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from hyperlr_ext._common.checks import check_choice, check_number
from hyperlr_ext.functional._hd_rule import LogLrAdam

__all__ = [
    "HYPER_OPTIMIZERS",
    "ROBUST_PRESET",
    "check_lr_in_bounds",
    "count_warmup_step",
    "ensure_adam_state",
    "group_warmup_factor",
    "hyper_settings",
    "initial_adam_state",
    "log_lr_adam",
    "warmup_factor",
]

HYPER_OPTIMIZERS = ("sgd", "adam")

# The defaults of hyper_optimizer="adam": Adam's step size on log eta (hyper_lr), its moment
# decays and epsilon, the bounds of eta, and a linear warm-up of the applied LR over the first
# steps (log eta moves during it, before a too-large initial LR has done its damage). Chosen
# by the benchmark on its training tasks (benchmarks/preset.py).
ROBUST_PRESET: dict[str, Any] = {
    "hyper_lr": 0.1,
    "hyper_betas": (0.9, 0.999),
    "hyper_eps": 1e-20,
    "lr_bounds": (1e-8, 10.0),
    "lr_warmup": 10,
}

_ADAM_ONLY = ("hyper_betas", "hyper_eps", "lr_bounds")


def hyper_settings(
    *,
    hyper_optimizer: str,
    hyper_lr: float | None,
    hyper_betas: tuple[float, float] | None,
    hyper_eps: float | None,
    lr_bounds: tuple[float, float] | None,
    lr_warmup: int | None,
    sgd_hyper_lr: float,
    multiplicative: bool,
) -> dict[str, Any]:
    """Checks the hyper-optimizer's arguments and returns them with their defaults filled in:
    ``sgd_hyper_lr`` and no warm-up for the rules of ``"sgd"`` (which take no other Adam
    hyper-argument), the robust preset for ``"adam"``. Raises ValueError naming the argument
    and its accepted values. The initial LR must lie in ``lr_bounds``
    (:func:`check_lr_in_bounds`, per param group)."""
    check_choice("hyper_optimizer", hyper_optimizer, HYPER_OPTIMIZERS)
    if lr_warmup is None:
        lr_warmup = ROBUST_PRESET["lr_warmup"] if hyper_optimizer == "adam" else 0
    if isinstance(lr_warmup, bool) or not isinstance(lr_warmup, int) or lr_warmup < 0:
        raise ValueError(
            f"Invalid lr_warmup value: {lr_warmup!r}; lr_warmup must be an integer >= 0 (steps)"
        )
    given = {"hyper_betas": hyper_betas, "hyper_eps": hyper_eps, "lr_bounds": lr_bounds}
    if hyper_optimizer == "sgd":
        extra = [name for name in _ADAM_ONLY if given[name] is not None]
        if extra:
            raise ValueError(
                f"{', '.join(extra)} apply to hyper_optimizer='adam' only; "
                "hyper_optimizer='sgd' takes hyper_lr alone"
            )
        hyper_lr = sgd_hyper_lr if hyper_lr is None else hyper_lr
        check_number("hyper_lr", hyper_lr)
        return {"hyper_optimizer": "sgd", "hyper_lr": float(hyper_lr), "hyper_betas": None,
                "hyper_eps": None, "lr_bounds": None, "lr_warmup": lr_warmup}  # fmt: skip
    if multiplicative:
        raise ValueError(
            "multiplicative=True is a rule of hyper_optimizer='sgd'; hyper_optimizer='adam' "
            "already steps on log eta: leave multiplicative False"
        )
    out = {"hyper_optimizer": "adam", "lr_warmup": lr_warmup}
    for name, value in (("hyper_lr", hyper_lr), *given.items()):
        out[name] = ROBUST_PRESET[name] if value is None else value
    check_number("hyper_lr", out["hyper_lr"])
    out["hyper_lr"] = float(out["hyper_lr"])
    out["hyper_betas"] = _pair("hyper_betas", out["hyper_betas"], high=1.0)
    out["hyper_eps"] = check_number("hyper_eps", out["hyper_eps"])
    if out["hyper_eps"] <= 0:
        raise ValueError(f"Invalid hyper_eps value: {out['hyper_eps']}; hyper_eps must be > 0")
    low, high = _pair("lr_bounds", out["lr_bounds"], high=math.inf)
    if not 0 < low <= high:
        raise ValueError(
            f"Invalid lr_bounds value: {(low, high)}; lr_bounds must be (low, high) with "
            "0 < low <= high (the learned LR moves on a log scale)"
        )
    out["lr_bounds"] = (low, high)
    return out


def check_lr_in_bounds(lr: float, bounds: tuple[float, float]) -> None:
    """An Adam hyper-optimizer's initial LR lies in its bounds (log eta must exist)."""
    if not bounds[0] <= lr <= bounds[1]:
        raise ValueError(
            f"Invalid learning rate: {lr}; with hyper_optimizer='adam' lr must lie in "
            f"lr_bounds {tuple(bounds)}"
        )


def _pair(name: str, value: Any, *, high: float) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be a pair of floats")
    return tuple(check_number(f"{name}[{i}]", v, high=high) for i, v in enumerate(value))


def initial_adam_state(shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """A fresh Adam state for LR slots of ``shape``: (m, v, beta1^0, beta2^0) = (0, 0, 1, 1)."""
    state = torch.zeros((*shape, 4), dtype=dtype, device=device)
    state[..., 2:] = 1.0
    return state


def ensure_adam_state(group: dict[str, Any], shape: tuple[int, ...], device, dtype) -> None:
    """With ``hyper_optimizer="adam"``: ``group["hyper_adam_state"]`` for LR slots of ``shape``
    on the params' device, a fresh one where it is missing or was made on the meta device."""
    if group.get("hyper_optimizer", "sgd") != "adam":
        return
    state = group.get("hyper_adam_state")
    if state is None or state.is_meta:
        group["hyper_adam_state"] = initial_adam_state(shape, dtype, device)
        return
    if tuple(state.shape) != (*shape, 4):
        raise ValueError(
            f"param_group['hyper_adam_state'] has shape {tuple(state.shape)}, expected "
            f"{(*shape, 4)} (4 values per LR slot)"
        )
    group["hyper_adam_state"] = state.to(device=device, dtype=dtype)


def warmup_factor(lr_warmup: int, done: int) -> float:
    """The warm-up's factor on the applied LR at a step after ``done`` steps: (done + 1) /
    lr_warmup while done < lr_warmup, then 1. The LR learners count the steps on the host
    (``warmup_steps_done``; a step skipped for inf/NaN gradients counts too)."""
    return 1.0 if done >= lr_warmup else (done + 1) / lr_warmup


def group_warmup_factor(group: dict[str, Any]) -> float:
    """:func:`warmup_factor` of a param group of ours."""
    return warmup_factor(group.get("lr_warmup", 0), group.get("warmup_steps_done", 0))


def count_warmup_step(state: dict[str, Any], lr_warmup: int) -> None:
    """One more step for the warm-up of ``lr_warmup`` steps counted in ``state`` (a param group,
    or HyperLR's group state); nothing once it is over."""
    done = state.get("warmup_steps_done", 0)
    if done < lr_warmup:
        state["warmup_steps_done"] = done + 1


def log_lr_adam(group: dict[str, Any], states: list[Tensor]) -> LogLrAdam | None:
    """The Adam step of ``group`` with the given slot states, or None for ``"sgd"``."""
    if group.get("hyper_optimizer", "sgd") != "adam":
        return None
    beta1, beta2 = group["hyper_betas"]
    low, high = group["lr_bounds"]
    return LogLrAdam(beta1, beta2, group["hyper_eps"], low, high, states)
