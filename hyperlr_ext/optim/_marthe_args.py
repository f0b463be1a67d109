"""MARTHE/RTHO's argument checks: the constructor's, and a param group's against the others.
Every failure names the argument and the accepted range."""

from __future__ import annotations

from typing import Any

from hyperlr_ext._common.checks import check_bool, check_choice, check_number, check_optional_bool
from hyperlr_ext._common.sharded import mesh_group
from hyperlr_ext._dispatch import check_fused_params

__all__ = ["HVP_KINDS", "algorithm_of", "check_marthe_arguments", "check_marthe_group"]

# How the Hessian-vector product is formed: double backward, central or forward differences.
HVP_KINDS = ("autograd", "finite_difference", "forward_difference")


def algorithm_of(inner: str) -> str:
    """The dispatch name of the fused tangent step for an inner optimizer."""
    return "marthe_sgd" if inner == "sgd" else "marthe_adam"


def check_marthe_arguments(
    *, lr, hyper_lr, inner, momentum, dampening, nesterov, betas, eps, weight_decay, mu,
    hyper_hyper_lr, hvp, hvp_every, fd_eps, foreach, fused, distributed, skip_nonfinite,
) -> None:  # fmt: skip
    """The constructor's arguments, each in its range."""
    check_number("lr", lr, label="learning rate")
    check_number("hyper_lr", hyper_lr)
    check_number("hyper_hyper_lr", hyper_hyper_lr)
    check_number("momentum", momentum)
    check_number("dampening", dampening, high=1.0, high_inclusive=True)
    check_number("weight_decay", weight_decay)
    check_number("eps", eps)
    check_number("fd_eps", fd_eps, low=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
    for index, beta in enumerate(betas):
        check_number(f"betas[{index}]", beta, high=1.0, label="beta parameter at index "
                     f"{index}")  # fmt: skip
    check_bool("nesterov", nesterov)
    check_bool("skip_nonfinite", skip_nonfinite)
    check_optional_bool("foreach", foreach)
    check_optional_bool("fused", fused)
    check_optional_bool("distributed", distributed)
    check_choice("hvp", hvp, HVP_KINDS)
    if isinstance(hvp_every, bool) or not isinstance(hvp_every, int) or hvp_every < 1:
        raise ValueError(f"hvp_every must be an integer >= 1, got {hvp_every!r}")
    check_choice("inner", inner, ("sgd", "adam", "adamw"))
    if mu != "adaptive":
        check_number("mu", mu, high=1.0, high_inclusive=True)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            "Nesterov momentum requires a momentum and zero dampening "
            f"(got momentum={momentum}, dampening={dampening})"
        )
    if inner != "sgd" and (momentum != 0 or dampening != 0 or nesterov):
        raise ValueError(
            f"momentum, dampening and nesterov are SGD settings; inner={inner!r} takes betas"
        )


def check_marthe_group(group: dict[str, Any], earlier_groups: list[dict[str, Any]]) -> None:
    """A new param group: DTensor (FSDP2) groups only beside DTensor groups, without fused
    kernels or double-backward Hessian products; fused groups with params the kernels take."""
    sharded = mesh_group(group["params"]) is not None
    if any((mesh_group(g["params"]) is not None) != sharded
           for g in earlier_groups if g["params"]):  # fmt: skip
        raise ValueError(
            "MARTHE/RTHO: either every param group holds DTensor (FSDP2) parameters or none"
        )
    if sharded:
        if group["fused"]:
            raise ValueError(
                "fused=True does not support DTensor (FSDP2) parameters; MARTHE steps their "
                "local shards with the pure-PyTorch path (fused=None or False)"
            )
        if group["hvp"] == "autograd" and group["mu"] != 0:
            raise ValueError(
                'MARTHE/RTHO under FSDP2 (DTensor parameters) need hvp="finite_difference" (or '
                '"forward_difference"): '
                "a Hessian product by double backward would have to pass through FSDP2's "
                "all-gather and reduce-scatter, which autograd cannot differentiate (under "
                "DDP both work)"
            )
    elif group["fused"] and not any(p.is_meta for p in group["params"]):
        # Params on the meta device (deferred initialisation) are checked at step().
        check_fused_params(algorithm_of(group["inner"]), group["params"])
