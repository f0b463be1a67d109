"""``SGDHD``: torch.optim.SGD whose learning rate is learned online by hypergradient descent."""

from __future__ import annotations

from typing import Any

from hyperlr_ext._common.checks import check_bool, check_number
from hyperlr_ext._common.sharded import local_view, shard_like, sum_reducer
from hyperlr_ext.functional.sgd_hd import sgd_hd
from hyperlr_ext.optim._hd_base import HDOptimizer, _lr_scale, check_hd_arguments
from hyperlr_ext.optim._hyper_optimizer import hyper_settings

__all__ = ["SGDHD"]


class SGDHD(HDOptimizer):
    r"""SGD (with momentum / Nesterov) plus hypergradient descent on the LR: SGD-HD, SGDN-HD.

    The inner step is exactly ``torch.optim.SGD``'s, ``w <- w - s_t * eta_t * d_t``, with d_t the
    (decayed) gradient, the momentum buffer, or ``g + momentum * buffer`` for Nesterov. Before
    stepping, the learned LR eta moves along the hypergradient (Baydin et al. 2018):

    .. math::
        h_t = \langle \hat g_t, s_{t-1} d_{t-1} \rangle,\qquad
        \eta_t = \max(\eta_{t-1} + \beta h_t, 0)\ \text{(additive)},\qquad
        \eta_t = \eta_{t-1}\bigl(1 + \beta \tfrac{h_t}{\|\hat g_t\| \|s_{t-1} d_{t-1}\|}\bigr)
        \ \text{(multiplicative)}

    where :math:`\hat g_t` is the gradient of the objective (the L2-decayed training gradient, or
    the validation gradient when ``step(val_closure=...)`` is used) and ``s_t`` the scheduler scale
    ``group["lr"] / group["initial_lr"]``.

    Args:
        params: parameters or param groups.
        lr: initial learning rate eta_0 (float >= 0).
        hyper_lr: beta, the hypergradient step size (float >= 0; 0 gives torch.optim.SGD);
            default 1e-3, or the robust preset's with ``hyper_optimizer="adam"``.
        momentum, dampening, nesterov, weight_decay, maximize: as in ``torch.optim.SGD``.
        multiplicative: use the multiplicative rule instead of the additive one.
        per_tensor: learn one LR per parameter tensor instead of one per group.
        lr_lag: 0 = exact (the LR learned at step t is used at step t); 1 = the step uses the LR
            learned up to step t-1 (one step of delay; one pass in the fused kernels).
        foreach, fused: implementation choice (see ``hyperlr_ext._dispatch``).
        hyper_optimizer: ``"sgd"`` (the default: the rule above, step ``hyper_lr``) or
            ``"adam"``: an Adam step on log eta from its hypergradient eta * dE/d eta, so the LR
            moves by about ``hyper_lr`` in log per step whatever the scale of the gradients; its
            hyper-arguments (``hyper_lr``, ``hyper_betas``, ``hyper_eps``, ``lr_bounds``) default
            to the robust preset (``hyperlr_ext.optim.ROBUST_PRESET``).
        hyper_betas, hyper_eps: Adam's moment decays and epsilon on log eta ("adam" only).
        lr_bounds: (low, high), 0 < low <= lr <= high: where eta may go ("adam" only).
        lr_warmup: steps of a linear warm-up of the applied LR (the k-th step applies
            (k + 1) / lr_warmup of it, on top of any scheduler; the hypergradient sees the
            scale, so the learned LR already moves during it); default 0, or the preset's 10
            with ``"adam"``.
        differentiable: must be False. capturable: accepted; every path is already sync-free.

    Each param group exposes ``effective_lr`` (the LR the last step applied) and ``hypergrad``
    (dE/d eta of the last step) as device tensors; reading them is your sync, never ours.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = SGDHD(model.parameters(), lr=0.01, hyper_lr=1e-3, momentum=0.9, nesterov=True)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> _ = opt.step()
    """

    _algorithm = "sgd_hd"
    _IDENTITY_KEYS = ("hyper_lr", "lr_lag", "momentum", "dampening", "nesterov")
    _STATE_KEYS = ("momentum_buffer", "prev_direction")

    def __init__(
        self,
        params,
        lr: float = 0.01,
        hyper_lr: float | None = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
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
            sgd_hyper_lr=1e-3,
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
        check_number("momentum", momentum)
        check_number("dampening", dampening, high=1.0, high_inclusive=True)
        if check_bool("nesterov", nesterov) and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={momentum}, dampening={dampening})"
            )
        defaults = dict(
            hd_settings, **hyper, momentum=momentum, dampening=dampening, nesterov=nesterov,
            skip_nonfinite=check_bool("skip_nonfinite", skip_nonfinite),
        )  # fmt: skip
        super().__init__(params, defaults)

    def _step_group(self, group: dict[str, Any], objective_grads) -> None:
        indices, params = self._gather(group)
        if not params:
            return
        reducer = sum_reducer(params, group["fused"])  # FSDP2: sums over the mesh
        sharded = reducer is not None
        local = local_view(sharded)  # under FSDP2 the step sees the shards
        states = [self.state[p] for p in params]
        fresh = [len(s) == 0 for s in states]
        momentum_buffers = local([s.get("momentum_buffer") for s in states])
        prev_directions = local([s.get("prev_direction") for s in states])
        lrs, hypergrads, effective_lrs = self._slots(group, indices)
        lr_scale = _lr_scale(group)
        sgd_hd(
            local(params),
            local([p.grad for p in params]),
            momentum_buffers,
            prev_directions,
            self._has_previous(group, indices, fresh),
            lrs,
            hypergrads,
            effective_lrs,
            local(self._objective_list(objective_grads, params) or []) or None,
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            **self._hd_kwargs(group, indices, lr_scale, reducer),
        )
        for p, state, buf, direction in zip(params, states, momentum_buffers, prev_directions):
            # Buffers the step created; under FSDP2 DTensors like their params (the existing
            # ones were updated in place through their local shards).
            if buf is not None and "momentum_buffer" not in state:
                state["momentum_buffer"] = shard_like(buf, p) if sharded else buf
            if direction is not None and "prev_direction" not in state:
                state["prev_direction"] = shard_like(direction, p) if sharded else direction
        self._finish_group(group, indices, lr_scale)
