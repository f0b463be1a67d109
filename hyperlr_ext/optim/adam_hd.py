"""``AdamHD``: torch.optim.Adam / AdamW whose learning rate is learned by hypergradient descent."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hyperlr_ext._common.checks import check_bool, check_number
from hyperlr_ext._common.sharded import local_view, sum_reducer
from hyperlr_ext.functional.adam_hd import adam_hd
from hyperlr_ext.optim._hd_base import HDOptimizer, _lr_scale, check_hd_arguments
from hyperlr_ext.optim._hyper_optimizer import hyper_settings

__all__ = ["AdamHD"]


def _pack_steps(states: list[dict[str, Any]]) -> None:
    """Puts the step counts of ``states`` into one tensor (each state's "step" a view of it, same
    values) where they share a device and dtype, as freshly created states have them."""
    steps = [s["step"] for s in states if isinstance(s.get("step"), Tensor)]
    if len(steps) != len(states) or not steps:
        return
    if len({(t.device, t.dtype) for t in steps}) != 1 or any(t.dim() != 0 for t in steps):
        return
    for state, view in zip(states, torch.stack(steps).unbind(0)):
        state["step"] = view


class AdamHD(HDOptimizer):
    r"""Adam (or AdamW) plus hypergradient descent on the LR: Adam-HD, additive or multiplicative.

    The inner step is exactly ``torch.optim.Adam``'s (``decoupled_weight_decay=True``: AdamW's),
    ``w <- w - s_t * eta_t * d_t`` with ``d_t = m_hat_t / (sqrt(v_hat_t) + eps)`` (plus
    ``weight_decay * w_t`` for AdamW). The learned LR follows the same rules as :class:`SGDHD`;
    d_{t-1} is recomputed from the moments, so there is no extra state.

    Args:
        params: parameters or param groups.
        lr: initial learning rate eta_0 (float >= 0).
        hyper_lr: beta, the hypergradient step size (float >= 0; 0 gives torch.optim.Adam);
            default 1e-7, or the robust preset's with ``hyper_optimizer="adam"``.
        betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.Adam``.
        decoupled_weight_decay: AdamW's decoupled decay instead of L2.
        multiplicative, per_tensor, lr_lag, foreach, fused: as in :class:`SGDHD`.
        hyper_optimizer, hyper_betas, hyper_eps, lr_bounds, lr_warmup: as in :class:`SGDHD`.
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
        hyper_lr: float | None = None,
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
        hyper_optimizer: str = "sgd",
        hyper_betas: tuple[float, float] | None = None,
        hyper_eps: float | None = None,
        lr_bounds: tuple[float, float] | None = None,
        lr_warmup: int | None = None,
    ) -> None:
        hyper = hyper_settings(
            hyper_optimizer=hyper_optimizer, hyper_lr=hyper_lr, hyper_betas=hyper_betas,
            hyper_eps=hyper_eps, lr_bounds=lr_bounds, lr_warmup=lr_warmup,
            sgd_hyper_lr=1e-7,
            multiplicative=multiplicative,
        )  # fmt: skip
        hd_settings = dict(
            lr=lr,
            hyper_lr=hyper["hyper_lr"],
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
            **hyper,
            betas=tuple(float(b) for b in betas),
            eps=eps,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            skip_nonfinite=check_bool("skip_nonfinite", skip_nonfinite),
        )
        super().__init__(params, defaults)

    def _init_states(self, group: dict[str, Any], params: list[Tensor], states, fresh) -> None:
        """Adam's state for the params seen for the first time (and amsgrad's maximum where
        missing). The step counts are device tensors in the LR's dtype (bias corrections are
        formed on the device, no sync, exact in float64), created as views of one tensor so
        that the fused step adds 1 to all of them with one op (:func:`_pack_steps`)."""
        new = [(p, s) for p, s, f in zip(params, states, fresh) if f]
        if new:
            _, dtype = self._hyper_device_dtype(group)
            steps = torch.zeros(len(new), dtype=dtype, device=new[0][0].device)
            for (p, state), step in zip(new, steps.unbind(0)):
                state["step"] = step
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            for p, state in zip(params, states):
                if "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )

    def _after_load(self, state_dict: dict[str, Any]) -> None:
        super()._after_load(state_dict)
        for group in self.param_groups:
            _pack_steps([self.state[p] for p in group["params"] if p in self.state])

    def _step_group(self, group: dict[str, Any], objective_grads) -> None:
        indices, params = self._gather(group)
        if not params:
            return
        states = [self.state[p] for p in params]
        fresh = [len(s) == 0 for s in states]
        self._init_states(group, params, states, fresh)
        lrs, hypergrads, effective_lrs = self._slots(group, indices)
        lr_scale = _lr_scale(group)
        beta1, beta2 = group["betas"]
        reducer = sum_reducer(params, group["fused"])  # FSDP2: sums over the mesh
        sharded = reducer is not None
        local = local_view(sharded)  # under FSDP2 the step sees the shards
        adam_hd(
            local(params),
            local([p.grad for p in params]),
            local([s["exp_avg"] for s in states]),
            local([s["exp_avg_sq"] for s in states]),
            local([s["max_exp_avg_sq"] for s in states]) if group["amsgrad"] else [],
            [s["step"] for s in states],
            self._has_previous(group, indices, fresh),
            lrs,
            hypergrads,
            effective_lrs,
            local(self._objective_list(objective_grads, params) or []) or None,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"],
            **self._hd_kwargs(group, indices, lr_scale, reducer),
        )
        self._finish_group(group, indices, lr_scale)
