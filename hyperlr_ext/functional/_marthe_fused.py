"""The fused tangent step of MARTHE / RTHO: the compiled ops of csrc/tangent*.{h,cpp} and
csrc/cuda/tangent.cu behind the signatures of ``tangent_sgd_step_`` and ``tangent_adam_step_``
(hyperlr_ext/functional/marthe.py), and the dot products of the hypergradient with
``multi_tensor_dot`` (one fixed-order reduction over all tensors, on the device).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fused_tangent_adam_step_", "fused_list_dot", "fused_tangent_sgd_step_"]


def fused_list_dot(a: list[Tensor], b: list[Tensor], dtype: torch.dtype) -> Tensor:
    """sum_i <a_i, b_i> by the compiled reduction (float32 accumulation, float64 for float64),
    as a 0-dim tensor of ``dtype``."""
    return torch.ops.hyperlr_ext.multi_tensor_dot(a, b).to(dtype)


def fused_tangent_sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    hvps: list[Tensor],
    momentum_buffers: list[Tensor],
    z_params: list[Tensor],
    z_buffers: list[Tensor],
    directions: list[Tensor],
    *,
    lr: Tensor,
    mu: Tensor,
    lr_scale: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    first_step: bool,
    found_inf: Tensor | None = None,
) -> None:
    """``tangent_sgd_step_`` by the compiled one-pass kernel (same arguments, same results)."""
    torch.ops.hyperlr_ext.tangent_sgd_step_(
        params, grads, hvps, momentum_buffers, z_params, z_buffers, directions, lr, mu,
        lr_scale, momentum, dampening, nesterov, weight_decay, first_step, found_inf,
    )  # fmt: skip


def fused_tangent_adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    hvps: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    z_params: list[Tensor],
    z_exp_avgs: list[Tensor],
    z_exp_avg_sqs: list[Tensor],
    directions: list[Tensor],
    *,
    lr: Tensor,
    mu: Tensor,
    step: Tensor,
    lr_scale: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    found_inf: Tensor | None = None,
) -> None:
    """``tangent_adam_step_`` by the compiled one-pass kernel (same arguments, same results)."""
    torch.ops.hyperlr_ext.tangent_adam_step_(
        params, grads, hvps, exp_avgs, exp_avg_sqs, z_params, z_exp_avgs, z_exp_avg_sqs,
        directions, lr, mu, step, lr_scale, beta1, beta2, eps, weight_decay,
        decoupled_weight_decay, found_inf,
    )  # fmt: skip
