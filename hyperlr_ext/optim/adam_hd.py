"""``AdamHD``: torch.optim.Adam / AdamW whose learning rate is learned by hypergradient descent."""

from __future__ import annotations

from typing import Any

import torch

from hyperlr_ext._common.checks import check_bool, check_number
from hyperlr_ext._common.sharded import local_shards, sum_reducer
from hyperlr_ext.functional.adam_hd import adam_hd
from hyperlr_ext.optim._hd_base import HDOptimizer, _lr_scale, check_hd_arguments

__all__ = ["AdamHD"]


class AdamHD(HDOptimizer):
    r"""Adam (or AdamW) plus hypergradient descent on the LR: Adam-HD, additive or multiplicative.

    The inner step is exactly ``torch.optim.Adam``'s (``decoupled_weight_decay=True``: AdamW's),
    ``w <- w - s_t * eta_t * d_t`` with ``d_t = m_hat_t / (sqrt(v_hat_t) + eps)`` (plus
    ``weight_decay * w_t`` for AdamW). The learned LR follows the same rules as :class:`SGDHD`;
    d_{t-1} is recomputed from the moments, so there is no extra state.

    Args:
        params: parameters or param groups.
        lr: initial learning rate eta_0 (float >= 0).
        hyper_lr: beta, the hypergradient step size (float >= 0; 0 gives torch.optim.Adam).
        betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.Adam``.
        decoupled_weight_decay: AdamW's decoupled decay instead of L2.
        multiplicative, per_tensor, lr_lag, foreach, fused: as in :class:`SGDHD`.
        differentiable: must be False. capturable: accepted; every path is already sync-free.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = AdamHD(model.parameters(), lr=1e-3, hyper_lr=1e-7)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> _ = opt.step()
    """

    _algorithm = "adam_hd"
    _IDENTITY_KEYS = ("hyper_lr", "lr_lag", "betas", "eps", "amsgrad")
    _STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        hyper_lr: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        amsgrad: bool = False,
        multiplicative: bool = False,
        per_tensor: bool = False,
        lr_lag: int = 0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        capturable: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        hd_settings = dict(
            lr=lr,
            hyper_lr=hyper_lr,
            weight_decay=weight_decay,
            multiplicative=multiplicative,
            per_tensor=per_tensor,
            lr_lag=lr_lag,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
            capturable=capturable,
        )
        check_hd_arguments(algorithm=self._algorithm, **hd_settings)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas value: {betas!r}; betas must be a pair of floats")
        tensor_betas = [isinstance(b, torch.Tensor) for b in betas]
        if any(tensor_betas) and not all(tensor_betas):
            raise ValueError("betas must be either both floats or both Tensors")
        if all(tensor_betas):
            where = " for capturable=False and foreach=True" if foreach and not capturable else ""
            raise ValueError(
                f"betas[0] as a Tensor is not supported{where} by AdamHD; pass betas as floats"
            )
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta, high=1.0, label=f"beta parameter at index {i}")
        check_number("eps", eps, label="epsilon value")
        check_bool("decoupled_weight_decay", decoupled_weight_decay)
        check_bool("amsgrad", amsgrad)
        defaults = dict(
            hd_settings,
            betas=tuple(float(b) for b in betas),
            eps=eps,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            skip_nonfinite=check_bool("skip_nonfinite", skip_nonfinite),
        )
        super().__init__(params, defaults)

    def _init_state(self, group: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if len(state) == 0:
            _, dtype = self._hyper_device_dtype(group)
            # The step count is a device tensor in the LR's dtype: bias corrections are formed
            # on the device (no sync) and are exact in float64.
            state["step"] = torch.zeros((), dtype=dtype, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _step_group(self, group: dict[str, Any], objective_grads) -> None:
        indices, params = self._gather(group)
        if not params:
            return
        fresh = [len(self.state[p]) == 0 for p in params]
        states = [self._init_state(group, p) for p in params]
        lrs, hypergrads, effective_lrs = self._slots(group, indices)
        lr_scale = _lr_scale(group)
        beta1, beta2 = group["betas"]
        reducer = sum_reducer(params, group["fused"])  # FSDP2: sums over the mesh
        sharded = reducer is not None
        adam_hd(
            local_shards(params),
            local_shards([p.grad for p in params]),
            local_shards([s["exp_avg"] for s in states]),
            local_shards([s["exp_avg_sq"] for s in states]),
            local_shards([s["max_exp_avg_sq"] for s in states]) if group["amsgrad"] else [],
            [s["step"] for s in states],
            self._has_previous(group, indices, fresh),
            lrs,
            hypergrads,
            effective_lrs,
            local_shards(self._objective_list(objective_grads, params) or []) or None,
            foreach=False if sharded else group["foreach"],
            fused=False if sharded else group["fused"],
            lr_scale=lr_scale,
            prev_lr_scale=group["hd_prev_scale"],
            hyper_lr=group["hyper_lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"],
            multiplicative=group["multiplicative"],
            lr_lag=group["lr_lag"],
            maximize=group["maximize"],
            sum_reducer=reducer,
            **self._amp,
        )
        self._finish_group(group, indices, lr_scale)
