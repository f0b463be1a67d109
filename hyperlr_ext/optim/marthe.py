"""MARTHE and RTHO: the LR learned from forward-mode (tangent) hypergradients.

Equations: docs/design.md, "Tangent-system methods", hyperlr_ext/functional/marthe.py and
docs/tangents.md. RTHO is MARTHE with mu = 1 and a fixed hyper-LR; with ``val_closure`` it is
RT-HPO; mu = 0 is HD. The inner dynamics are torch.optim.SGD's (momentum, dampening, Nesterov, L2
decay) or Adam's / AdamW's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hyperlr_ext._common.devices import hyper_device_dtype, placed_like_params
from hyperlr_ext._common.sharded import local_shards
from hyperlr_ext._common.sharded import mesh_group as mesh_group_or_none
from hyperlr_ext._dispatch import check_fused_request
from hyperlr_ext.functional._hd_rule import FoundInfGuard, log_lr_adam_, nonfinite_check_
from hyperlr_ext.functional._marthe_fused import (
    fused_tangent_adam_step_,
    fused_tangent_sgd_step_,
)
from hyperlr_ext.functional.marthe import (
    marthe_mu_,
    tangent_adam_step_,
    tangent_sgd_step_,
)
from hyperlr_ext.optim._hd_base import _lr_scale
from hyperlr_ext.optim._hyper_lr_search import find_hyper_lr
from hyperlr_ext.optim._hyper_optimizer import (
    check_lr_in_bounds,
    count_warmup_step,
    ensure_adam_state,
    hyper_settings,
    log_lr_adam,
)
from hyperlr_ext.optim._lr_learner import LRLearner
from hyperlr_ext.optim._marthe_args import algorithm_of, check_marthe_arguments, check_marthe_group
from hyperlr_ext.optim._marthe_grads import (
    Span,
    all_reduce_mean,
    averaging_group,
    direction_key,
    hessian_products,
    hyper_sums,
    loss_grads,
    loss_scale,
    record_found_inf,
    validation_grads,
)
from hyperlr_ext.optim._state_check import check_state_matches_params

__all__ = ["MARTHE", "RTHO"]

# Per-parameter state of each inner optimizer, besides Z_w ("z_param") and d ("direction").
_BUFFERS = {
    "sgd": ("momentum_buffer", "z_buffer"),
    "adam": ("exp_avg", "exp_avg_sq", "z_exp_avg", "z_exp_avg_sq"),
}
_GROUP_TENSORS = (
    "learned_lr", "effective_lr", "hypergrad", "prev_hypergrad", "learned_mu", "mu_c",
    "adapted_hyper_lr",
)  # fmt: skip


class MARTHE(LRLearner):
    """SGD, Adam or AdamW whose LR follows the tangent hypergradient (Donini et al., MARTHE).

    Args:
        params: parameters or param groups.
        lr: initial learned LR eta_0 (>= 0; the paper suggests 0 without prior knowledge).
        hyper_lr: beta_0, the hyper-LR (>= 0; default 1e-3, or the robust preset's with
            ``hyper_optimizer="adam"``).
        inner: the inner optimizer: ``"sgd"`` (torch.optim.SGD), ``"adam"`` (torch.optim.Adam,
            L2 decay in the gradient) or ``"adamw"`` (torch.optim.AdamW, decoupled decay).
        momentum, dampening, nesterov: as torch.optim.SGD (``inner="sgd"`` only).
        betas, eps: as torch.optim.Adam (``inner="adam"``/``"adamw"`` only).
        weight_decay: lambda, L2 for SGD and Adam, decoupled for AdamW.
        mu: ``"adaptive"`` (MARTHE's rule) or a fixed number in [0, 1] (1: RTHO, 0: HD).
        hyper_hyper_lr: beta', the step of HD on beta (0 keeps beta fixed; "sgd" only).
        hvp: ``"autograd"`` (double backward), ``"finite_difference"`` (two extra gradient
            evaluations at w +- e Z, for models without double-backward support) or
            ``"forward_difference"`` (one, at w + e Z, against the step's own gradient).
        hvp_every: form the Hessian product on every k-th step of the group only (1: every
            step, exact); on the others the tangent is propagated without the loss-Hessian term
            (H Z = 0), and the step needs no graph for double backward. The count is kept on
            the host: a step skipped for inf/NaN values counts too. docs/tangents.md,
            "Amortised Hessian products", gives the derivation and the measured error.
        fd_eps: the step of the finite difference, relative to |Z|.
        foreach: the pure-PyTorch tangent step as list ops (``torch._foreach_*``: a number of
            kernel launches that does not grow with the number of tensors; the default on
            CUDA) or one tensor at a time (False); None: as hyperlr_ext/_dispatch.py decides.
        fused: the compiled one-pass tangent step (None: where it is the default, see
            hyperlr_ext/_dispatch.py; True: required; False: a pure-PyTorch path).
        distributed: average gradients and Hessian products over the ranks of the default
            process group, as DDP needs (None: when one is initialised with more than one
            rank). DTensor parameters (FSDP2's ``fully_shard``) are handled apart: their
            gradients come from ``backward()`` through FSDP2, the local shards step, and the
            dot products take one all-reduce over the mesh; they need
            ``hvp="finite_difference"`` (double backward cannot pass FSDP2's collectives).
        skip_nonfinite: check the gradients and Hessian products for inf/NaN on the device and
            skip a step that has any (nothing changes; ``nonfinite_step`` holds the flag). Always
            on when ``step`` is given a ``scaler``.
        hyper_optimizer, hyper_betas, hyper_eps, lr_bounds, lr_warmup: ``"sgd"`` (the default:
            eta moves by -beta Delta) or ``"adam"``: an Adam step on log eta from eta Delta,
            with the robust preset's defaults (as in :class:`hyperlr_ext.SGDHD`); then lr must
            lie in ``lr_bounds`` (it cannot start at 0) and hyper_hyper_lr must be 0.

    ``step(closure, val_closure=None, *, hvp_closure=None, scaler=None)``: ``closure()``
    returns the training loss on the current batch and must not call ``backward()``;
    ``val_closure()`` optionally returns a validation loss (the objective E, RT-HPO);
    ``hvp_closure()`` optionally returns the training loss on a subsample of the batch, whose
    Hessian then stands for the batch's in the Hessian product (cheaper, noisier). Without
    ``val_closure``, E is the training objective (with its L2 term; AdamW's decoupled decay is
    not part of it). Each group exposes device tensors
    ``learned_lr``, ``effective_lr``, ``hypergrad`` (Delta = dE/d eta), ``learned_mu`` (mu) and
    ``adapted_hyper_lr`` (beta). With a ``torch.amp.GradScaler`` as ``scaler``, the losses are
    multiplied by its scale before differentiation, gradients and Hessian products are unscaled
    and checked, and the scaler records the check: call ``scaler.update()`` after the step
    (``scaler.step`` cannot be used: it refuses closures).
    """

    _IDENTITY_KEYS = ("hyper_lr", "inner", "mu", "hvp")
    _PUBLIC_ATTRS = ("nonfinite_step", "distributed")
    _STRUCTURAL_KEYS = ("inner", "hyper_optimizer")
    _STATE_KEYS = ("z_param", "direction", "step", *_BUFFERS["sgd"], *_BUFFERS["adam"])

    def __init__(
        self,
        params,
        lr: float = 0.0,
        hyper_lr: float | None = None,
        *,
        inner: str = "sgd",
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mu: str | float = "adaptive",
        hyper_hyper_lr: float = 0.0,
        hvp: str = "autograd",
        hvp_every: int = 1,
        fd_eps: float = 1e-4,
        foreach: bool | None = None,
        fused: bool | None = None,
        distributed: bool | None = None,
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
            sgd_hyper_lr=1e-3, multiplicative=False,
        )  # fmt: skip
        hyper_lr = hyper["hyper_lr"]
        if hyper_optimizer == "adam" and hyper_hyper_lr != 0:
            raise ValueError(
                "hyper_hyper_lr adapts the hyper-LR of hyper_optimizer='sgd'; with 'adam' the "
                "step on log eta is already normalised: leave hyper_hyper_lr at 0"
            )
        check_marthe_arguments(
            lr=lr, hyper_lr=hyper_lr, inner=inner, momentum=momentum, dampening=dampening,
            nesterov=nesterov, betas=betas, eps=eps, weight_decay=weight_decay, mu=mu,
            hyper_hyper_lr=hyper_hyper_lr, hvp=hvp, hvp_every=hvp_every, fd_eps=fd_eps,
            foreach=foreach, fused=fused, distributed=distributed, skip_nonfinite=skip_nonfinite,
        )  # fmt: skip
        check_fused_request(algorithm_of(inner), foreach, fused)
        defaults = dict(
            lr=lr, inner=inner, momentum=momentum, dampening=dampening,
            nesterov=nesterov, betas=tuple(float(b) for b in betas), eps=eps,
            weight_decay=weight_decay, mu=mu, hyper_hyper_lr=hyper_hyper_lr, hvp=hvp,
            hvp_every=hvp_every, fd_eps=fd_eps, foreach=foreach, fused=fused,
            skip_nonfinite=skip_nonfinite, **hyper,
        )  # fmt: skip
        super().__init__(params, defaults)
        self.distributed = distributed

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_marthe_group(group, self.param_groups[:-1])
        if group.get("hyper_optimizer", "sgd") != self.defaults["hyper_optimizer"]:
            raise ValueError(
                "Invalid hyper_optimizer value in a param group; hyper_optimizer is set for the "
                f"whole optimizer ({self.defaults['hyper_optimizer']!r}), not per group"
            )
        if group["hyper_optimizer"] == "adam":
            check_lr_in_bounds(group["lr"], group["lr_bounds"])
        self._init_group(group)

    @staticmethod
    def _init_group(group: dict[str, Any]) -> None:
        """Create the group's hyper-state where missing, on the params' device (no value read)."""
        device, dtype = hyper_device_dtype(group["params"])
        group.setdefault("initial_lr", group["lr"])
        initial = {
            "learned_lr": group["lr"], "effective_lr": group["lr"], "hypergrad": 0.0,
            "prev_hypergrad": 0.0, "mu_c": 0.0, "adapted_hyper_lr": group["hyper_lr"],
            "learned_mu": 0.0 if group["mu"] == "adaptive" else group["mu"],
        }  # fmt: skip
        for key in _GROUP_TENSORS:
            value = group.get(key)
            if value is None:
                group[key] = torch.full((), float(initial[key]), dtype=dtype, device=device)
            else:
                group[key] = placed_like_params(value, device, dtype, initial[key])
        ensure_adam_state(group, (), device, dtype)
        group.setdefault("hd_prev_scale", 1.0)
        group.setdefault("skip_nonfinite", False)
        group.setdefault("hvp_every", 1)
        group.setdefault("tangent_steps", 0)  # steps since the tangents exist (hvp_every's count)

    def _ensure_group_state(self, group: dict[str, Any]) -> None:
        self._init_group(group)

    # ------------------------------------------------------------------ the step
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor],
        val_closure: Callable[[], Tensor] | None = None,
        *,
        hvp_closure: Callable[[], Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """One step; returns the training loss the closure computed (detached, unscaled).

        Every gradient, dot product and Hessian product is formed before anything changes, so
        that a step skipped for inf/NaN values (``scaler`` or ``skip_nonfinite``) leaves the
        weights, the tangents, the buffers and the LR state as they were, decided on the device.
        """
        if closure is None:
            if self._initialises_state():
                return None
            raise ValueError("MARTHE/RTHO need a closure returning the training loss")
        groups = [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        check_state_matches_params(
            type(self).__name__, params, self.state, self._placed_state_keys()
        )
        for group, _ in groups:  # hyper-state where the params are (they may have moved)
            self._init_group(group)
        if not params:
            with torch.enable_grad():
                return closure().detach()
        mesh = mesh_group_or_none(params)  # FSDP2: the local shards step, FSDP2 reduces grads
        sharded = mesh is not None
        world = None if sharded else averaging_group(self.distributed)
        scale = loss_scale(scaler, self, params[0].device)
        spans, offset = [], 0
        for group, ps in groups:
            started = bool(ps) and all("z_param" in self.state.get(p, {}) for p in ps)
            product = started and group["mu"] != 0
            if started:  # hvp_every: the product on every k-th step of the tangents only
                product = product and group["tangent_steps"] % group["hvp_every"] == 0
                group["tangent_steps"] += 1
            else:
                group["tangent_steps"] = 0
            spans.append(Span(group, ps, slice(offset, offset + len(ps)), started, product,
                              sharded))  # fmt: skip
            offset += len(ps)
        autograd_hvp = any(sp.needs_hvp and sp.group["hvp"] == "autograd" for sp in spans)
        loss, grads = loss_grads(closure, params, graph=autograd_hvp and hvp_closure is None,
                                 scale=scale, by_backward=sharded)  # fmt: skip
        # The step uses the gradients averaged over ranks (as DDP would give them; FSDP2's
        # backward reduces them itself); `grads` keep their graph for the Hessian product.
        step_grads = all_reduce_mean([g.detach() for g in grads], world)
        val_grads = None
        if val_closure is not None:
            val_grads = validation_grads(val_closure, params, scale=scale, by_backward=sharded)
            val_grads = all_reduce_mean(val_grads, world)
        checking = scale is not None or any(g["skip_nonfinite"] for g, _ in groups)
        inv_scale = None if scale is None else scale.double().reciprocal().float()
        found_inf = None
        if checking:
            # Unscaled copies (the gradients keep their graph untouched), checked in one pass.
            n = len(step_grads)
            checked = [t.clone() for t in step_grads + (val_grads or [])]
            found_inf = nonfinite_check_(checked, inv_scale)
            step_grads = checked[:n]
            val_grads = None if val_grads is None else checked[n:]
        sums = hyper_sums(spans, self.state, step_grads, val_grads, mesh)
        if hvp_closure is None:
            hvp_closure, hvp_grads = closure, grads
        elif any(sp.needs_hvp and sp.group["hvp"] != "finite_difference" for sp in spans):
            # The subsample's gradients at w: for double backward, or the forward difference.
            _, hvp_grads = loss_grads(hvp_closure, params, graph=autograd_hvp, scale=scale,
                                      by_backward=sharded)  # fmt: skip
        else:
            hvp_grads = grads
        hvps = hessian_products(spans, self.state, hvp_grads, hvp_closure, world, scale, sums)
        if checking:
            if hvps:
                found_inf = found_inf + nonfinite_check_(hvps, inv_scale)
            if sharded:  # each rank checked its shards: decide together
                torch.distributed.all_reduce(found_inf, group=mesh)
        self.nonfinite_step = found_inf
        for span, group_sums in zip(spans, sums):
            if span.params:
                group_hvps = hvps[span.indices] if hvps else []
                self._step_group(span, step_grads[span.indices], group_hvps, group_sums,
                                 found_inf)  # fmt: skip
        if scale is not None:
            record_found_inf(scaler, self, found_inf)
        return loss

    def _initialises_state(self) -> bool:
        """torch.distributed.checkpoint's state initialisation: ``get_state_dict`` and
        ``set_state_dict`` call ``step()`` once on an optimizer without state, with zero
        gradients, every group's ``lr`` set to 0 and no closure, so that the state exists to be
        saved or loaded into. On that call (and only then) MARTHE creates its zero tangents,
        buffers and step counts, as its first step would, and moves nothing."""
        if self.state or any(g["lr"] != 0 for g in self.param_groups):
            return False
        for group in self.param_groups:
            self._init_group(group)
            self._init_state(group, [p for p in group["params"] if p.requires_grad])
        return True

    def _init_state(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Zero tangents and buffers for every tensor (all of a group start together; DTensors
        for DTensor parameters)."""
        inner = "sgd" if group["inner"] == "sgd" else "adam"
        dtype = group["learned_lr"].dtype
        for p in params:
            state = self.state[p]
            state.clear()
            state["z_param"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if direction_key(group) == "direction":
                state["direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if inner == "adam" or group["momentum"] != 0:
                for key in _BUFFERS[inner]:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if inner == "adam":
                state["step"] = torch.zeros((), dtype=dtype, device=p.device)

    def _hyper_update(self, group: dict[str, Any], sums: Tensor) -> None:
        """The hyper-update of docs/design.md, "Tangent-system methods", from the group's sums:
        Delta_t, then mu, beta and eta, on the device."""
        lr, mu = group["learned_lr"], group["learned_mu"]
        delta = sums[0]
        if group["mu"] == "adaptive":
            # g' = <B_{t-1}, grad E(w_t)> with B_{t-1} = -s_{t-1} d_{t-1} (0 while no d_{t-1} is
            # kept, as when mu switched to "adaptive" mid-run; then mu = 0).
            g_prime = -group["hd_prev_scale"] * sums[1]
            marthe_mu_(mu, group["mu_c"], delta, g_prime)
        beta = group["adapted_hyper_lr"]
        if group["hyper_hyper_lr"] != 0:
            beta.copy_(
                (beta + group["hyper_hyper_lr"] * delta * group["prev_hypergrad"]).clamp_min(0)
            )
        adam = log_lr_adam(group, [group.get("hyper_adam_state")])
        if adam is None:
            lr.copy_((lr - beta * delta).clamp_min(0))
        else:  # every step with tangents has a hypergradient
            log_lr_adam_(lr, delta, adam.states[0], torch.ones_like(lr, dtype=torch.bool),
                         alpha=float(group["hyper_lr"]), adam=adam)  # fmt: skip
        group["hypergrad"].copy_(delta)
        group["prev_hypergrad"].copy_(delta)

    def _step_group(self, span, step_grads, hvps, sums, found_inf) -> None:
        """One step of docs/design.md, "Tangent-system methods", for one group. ``hvps``:
        H Z_w per tensor, or an empty list when none was needed (it counts as 0). ``found_inf``
        (AMP / skip_nonfinite): when nonzero, every tensor the step writes is left with its bits
        (no host read)."""
        group, params = span.group, span.params
        states = [self.state[p] for p in params]
        if found_inf is not None:
            found_inf = found_inf.to(group["learned_lr"].device)
        lr_scale = _lr_scale(group)
        with torch.no_grad():
            if not span.started:
                self._init_state(group, params)
            # The group's hyper-state, put back on a skipped step (the tangent step leaves the
            # per-parameter tensors alone itself, and Adam's step counts add 0).
            hyper_state = [group[key] for key in _GROUP_TENSORS] + _adam_state(group)
            guard = FoundInfGuard(found_inf, [hyper_state])
            if span.started:
                self._hyper_update(group, sums)
            self._inner_step(group, params, step_grads, hvps, states, lr_scale, span.started,
                             span.implementation, found_inf)  # fmt: skip
            group["effective_lr"].copy_(group["learned_lr"] * lr_scale)
            guard.restore()
            group["hd_prev_scale"] = lr_scale
            count_warmup_step(group, group.get("lr_warmup", 0))

    def _inner_step(self, group, params, grads, hvps, states, lr_scale, started, implementation,
                    found_inf):  # fmt: skip
        """The inner step and the tangent update of every state buffer (one fused pass, or the
        reference with the same signature), on the local shards of DTensor parameters."""
        lr, mu = group["learned_lr"], group["learned_mu"]
        z_params = local_shards([s["z_param"] for s in states])
        # d_t only for MARTHE's adaptive mu (g' = -s <d_{t-1}, grad E>) where no buffer holds it;
        # a group switched to adaptive mu mid-run starts from d = 0.
        directions = []
        if direction_key(group) == "direction":
            for s, p in zip(states, params):
                if "direction" not in s:
                    s["direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                directions.append(s["direction"])
        directions = local_shards(directions)
        params = local_shards(params)
        fused = implementation == "fused"
        foreach = {} if fused else {"foreach": implementation == "foreach"}
        if group["inner"] == "sgd":
            has_buffer = group["momentum"] != 0
            buffers = local_shards([s["momentum_buffer"] for s in states] if has_buffer else [])
            z_buffers = local_shards([s["z_buffer"] for s in states] if has_buffer else [])
            step = fused_tangent_sgd_step_ if fused else tangent_sgd_step_
            step(
                params, grads, hvps, buffers, z_params, z_buffers, directions,
                lr=lr, mu=mu, lr_scale=lr_scale, momentum=group["momentum"],
                dampening=group["dampening"], nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], first_step=not started, found_inf=found_inf,
                **foreach,
            )  # fmt: skip
            return
        steps = [s["step"] for s in states]
        if found_inf is None:
            torch._foreach_add_(steps, 1.0)
        else:  # + 1, or + 0 on a skipped step (the Tensor overload would read the flag)
            keep = found_inf.reshape(()).eq(0).to(steps[0].dtype)
            torch._foreach_add_(steps, [keep] * len(steps))
        beta1, beta2 = group["betas"]
        step = fused_tangent_adam_step_ if fused else tangent_adam_step_
        step(
            params, grads, hvps,
            *(local_shards([s[key] for s in states]) for key in ("exp_avg", "exp_avg_sq")),
            z_params,
            *(local_shards([s[key] for s in states]) for key in ("z_exp_avg", "z_exp_avg_sq")),
            directions,
            lr=lr, mu=mu, step=steps[0], lr_scale=lr_scale, beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["inner"] == "adamw", found_inf=found_inf, **foreach,
        )  # fmt: skip

    # ------------------------------------------------------------------ selecting beta
    find_hyper_lr = classmethod(find_hyper_lr)


def _adam_state(group: dict[str, Any]) -> list[Tensor]:
    """The group's Adam state of log eta, as a list (empty with hyper_optimizer="sgd")."""
    state = group.get("hyper_adam_state")
    return [] if state is None else [state]


class RTHO(MARTHE):
    """Real-time hyperparameter optimisation of the LR (Franceschi et al.): MARTHE with mu = 1
    and a fixed hyper-LR. With ``step(closure, val_closure=...)`` it is RT-HPO."""

    def __init__(self, params, lr: float = 0.0, hyper_lr: float | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        for name in ("mu", "hyper_hyper_lr"):
            if name in kwargs:
                raise ValueError(f"RTHO fixes {name}; use MARTHE to set it")
        super().__init__(params, lr, hyper_lr, mu=1.0, hyper_hyper_lr=0.0, **kwargs)
