"""MARTHE and RTHO: the LR learned from forward-mode (tangent) hypergradients.

Equations: DESIGN.md §2 "Tangent-system methods", hyperlr_ext/functional/marthe.py and
docs/tangents.md. RTHO is MARTHE with mu = 1 and a fixed hyper-LR; with ``val_closure`` it is
RT-HPO; mu = 0 is HD. The inner dynamics are torch.optim.SGD's (momentum, dampening, Nesterov, L2
decay) or Adam's / AdamW's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from hyperlr_ext._dispatch import check_fused_params, check_fused_request, choose_implementation
from hyperlr_ext.functional._hd_rule import FoundInfGuard, nonfinite_check_
from hyperlr_ext.functional._marthe_fused import (
    fused_adam_tangent_step_,
    fused_list_dot,
    fused_sgd_tangent_step_,
)
from hyperlr_ext.functional.marthe import (
    adam_tangent_step_,
    marthe_mu_,
    sgd_tangent_step_,
    tensor_list_dot,
)
from hyperlr_ext.optim._checks import check_bool, check_choice, check_number, check_optional_bool
from hyperlr_ext.optim._hd_base import _lr_scale, hyper_device_dtype
from hyperlr_ext.optim._sharded import mesh_group as mesh_group_or_none
from hyperlr_ext.optim._state_check import check_state_dict, check_state_matches_params

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


class MARTHE(Optimizer):
    """SGD, Adam or AdamW whose LR follows the tangent hypergradient (Donini et al., MARTHE).

    Args:
        params: parameters or param groups.
        lr: initial learned LR eta_0 (>= 0; the paper suggests 0 without prior knowledge).
        hyper_lr: beta_0, the hyper-LR (>= 0).
        inner: the inner optimizer: ``"sgd"`` (torch.optim.SGD), ``"adam"`` (torch.optim.Adam,
            L2 decay in the gradient) or ``"adamw"`` (torch.optim.AdamW, decoupled decay).
        momentum, dampening, nesterov: as torch.optim.SGD (``inner="sgd"`` only).
        betas, eps: as torch.optim.Adam (``inner="adam"``/``"adamw"`` only).
        weight_decay: lambda, L2 for SGD and Adam, decoupled for AdamW.
        mu: ``"adaptive"`` (MARTHE's rule) or a fixed number in [0, 1] (1: RTHO, 0: HD).
        hyper_hyper_lr: beta', the step of HD on beta (0 keeps beta fixed).
        hvp: ``"autograd"`` (double backward) or ``"finite_difference"`` (two extra gradient
            evaluations at w +- e Z, for models without double-backward support).
        fd_eps: the step of the finite difference, relative to |Z|.
        fused: the compiled one-pass tangent step (None: where it is the default, see
            hyperlr_ext/_dispatch.py; True: required; False: the pure-PyTorch reference).
        distributed: average gradients and Hessian products over the ranks of the default
            process group (None: when one is initialised with more than one rank).
        skip_nonfinite: check the gradients and Hessian products for inf/NaN on the device and
            skip a step that has any (nothing changes; ``nonfinite_step`` holds the flag). Always
            on when ``step`` is given a ``scaler``.

    ``step(closure, val_closure=None, *, scaler=None)``: ``closure()`` returns the training loss
    on the current batch and must not call ``backward()``; ``val_closure()`` optionally returns a
    validation loss (the objective E, RT-HPO). Without it E is the training objective (with its
    L2 term; AdamW's decoupled decay is not part of it). Each group exposes device tensors
    ``learned_lr``, ``effective_lr``, ``hypergrad`` (Delta = dE/d eta), ``learned_mu`` (mu) and
    ``adapted_hyper_lr`` (beta). With a ``torch.amp.GradScaler`` as ``scaler``, the losses are
    multiplied by its scale before differentiation, gradients and Hessian products are unscaled
    and checked, and the scaler records the check: call ``scaler.update()`` after the step
    (``scaler.step`` cannot be used: it refuses closures).
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        hyper_lr: float = 1e-3,
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
        fd_eps: float = 1e-4,
        fused: bool | None = None,
        distributed: bool | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
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
        check_optional_bool("fused", fused)
        check_optional_bool("distributed", distributed)
        check_choice("hvp", hvp, ("autograd", "finite_difference"))
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
        check_fused_request(self._algorithm_of(inner), None, fused)
        defaults = dict(
            lr=lr, hyper_lr=hyper_lr, inner=inner, momentum=momentum, dampening=dampening,
            nesterov=nesterov, betas=tuple(float(b) for b in betas), eps=eps,
            weight_decay=weight_decay, mu=mu, hyper_hyper_lr=hyper_hyper_lr, hvp=hvp,
            fd_eps=fd_eps, fused=fused, skip_nonfinite=skip_nonfinite,
        )  # fmt: skip
        super().__init__(params, defaults)
        self.distributed = distributed

    def _world(self):
        """The default process group when gradients must be averaged across ranks, else None.
        MARTHE differentiates with torch.autograd.grad, which DDP's gradient hooks never see, so
        it averages its gradients and Hessian products itself (one all-reduce each)."""
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed is None:
            return dist.group.WORLD if active else None
        if self.distributed and not active:
            raise RuntimeError("MARTHE(distributed=True) needs an initialised process group")
        return dist.group.WORLD if self.distributed else None

    @staticmethod
    def _all_reduce_mean(tensors: list[Tensor], group) -> list[Tensor]:
        """The mean over ranks of every tensor, through one all-reduce of a flat buffer."""
        import torch.distributed as dist

        if group is None or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    @staticmethod
    def _algorithm_of(inner: str) -> str:
        return "marthe_sgd" if inner == "sgd" else "marthe_adam"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if mesh_group_or_none(group["params"]) is not None:
            raise ValueError(
                "MARTHE/RTHO do not support DTensor (FSDP2) parameters yet: their Hessian "
                "products need double backward through FSDP2's all-gather. Use DDP, under which "
                "they average their gradients and Hessian products themselves"
            )
        if group["fused"]:
            check_fused_params(self._algorithm_of(group["inner"]), group["params"])
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
            elif value.device != device or value.dtype != dtype:
                group[key] = value.to(device=device, dtype=dtype)
        group.setdefault("hd_prev_scale", 1.0)
        group.setdefault("skip_nonfinite", False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load; the group hyper-state then goes back to the params' devices. A
        state_dict of another optimizer, or of another inner optimizer, is refused first."""
        check_state_dict(
            type(self).__name__, state_dict, self.param_groups,
            identity=("hyper_lr", "inner", "mu", "hvp"), structural=("inner",),
            state_keys=("z_param", "direction", "step", *_BUFFERS["sgd"], *_BUFFERS["adam"]),
        )  # fmt: skip
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._init_group(group)

    # ------------------------------------------------------------------ gradients and HVPs
    @torch.compiler.disable  # autograd's own work (double backward cannot be compiled)
    def _training_grads(
        self, closure: Callable[[], Tensor], params: list[Tensor], graph: bool,
        scale: Tensor | None = None,
    ):  # fmt: skip
        """The loss and its gradients (with a graph for the Hessian product when ``graph``), of
        the loss times ``scale`` when given (AMP; the returned loss is unscaled)."""
        before = [(p.grad, None if p.grad is None else p.grad._version) for p in params]
        with torch.enable_grad():
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "closure must return the training loss as a scalar tensor, got "
                + (
                    f"shape {tuple(loss.shape)}"
                    if isinstance(loss, Tensor)
                    else type(loss).__name__
                )
            )
        for p, (grad, version) in zip(params, before):
            if p.grad is not grad or (grad is not None and grad._version != version):
                raise ValueError(
                    "closure must return the loss without calling backward(): MARTHE/RTHO "
                    "differentiate it themselves (and a second time for the Hessian product)"
                )
        if not loss.requires_grad:
            raise ValueError("closure returned a loss that does not require grad")
        with torch.enable_grad():
            scaled = loss.reshape(()) if scale is None else loss.reshape(()) * scale
            grads = torch.autograd.grad(scaled, params, create_graph=graph, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return loss.detach(), grads

    @torch.compiler.disable  # autograd's own work
    def _validation_grads(self, val_closure, params, scale: Tensor | None):
        """Gradients of the validation loss (times ``scale`` when given)."""
        with torch.enable_grad():
            val_loss = val_closure().reshape(())
            if scale is not None:
                val_loss = val_loss * scale
            grads = torch.autograd.grad(val_loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    @torch.compiler.disable  # autograd's own work (double backward cannot be compiled)
    def _hvp_autograd(self, grads: list[Tensor], params: list[Tensor], z: list[Tensor]):
        # A once_differentiable op leaves an error node in the gradient's graph, which autograd
        # skips silently with allow_unused: refuse it here rather than use a zero Hessian.
        # (Skipped under torch.compile, which cannot inspect grad_fn; the error then comes from
        # autograd itself.)
        if not torch.compiler.is_compiling() and any(
            type(g.grad_fn).__name__ in ("Error", "DelayedError") for g in grads
        ):
            raise RuntimeError(
                "MARTHE/RTHO need the Hessian-vector product, but the loss goes through an op "
                "without double backward (once_differentiable); pass "
                'hvp="finite_difference"'
            )
        # Gradients of params the loss does not reach are constant zeros: their rows of H are 0.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return [torch.zeros_like(p) for p in params]
        try:
            with torch.enable_grad():
                out = torch.autograd.grad(
                    [grads[i] for i in live], params, grad_outputs=[z[i] for i in live],
                    retain_graph=True, allow_unused=True,
                )  # fmt: skip
        except RuntimeError as error:
            raise RuntimeError(
                "MARTHE/RTHO could not differentiate the gradient a second time (the Hessian-"
                "vector product); this model may not support double backward: pass "
                f'hvp="finite_difference". Original error: {error}'
            ) from error
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, out)]

    @torch.compiler.disable  # autograd's own work (double backward cannot be compiled)
    def _hvp_finite_difference(self, closure, params, z, fd_eps, scale=None):
        """H z ~ (g(w + e z) - g(w - e z)) / (2 e), e = fd_eps / max(|z|, tiny) (no host sync)."""
        dtype = params[0].dtype
        norm = torch.sqrt(tensor_list_dot(z, z, dtype)).clamp_min(torch.finfo(dtype).tiny)
        eps = fd_eps / norm
        out = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, v in zip(params, z):
                    p.add_(sign * eps * v)
            _, g = self._training_grads(closure, params, graph=False, scale=scale)
            with torch.no_grad():
                for p, v in zip(params, z):
                    p.sub_(sign * eps * v)
            out.append(g)
        return [(a - b) / (2 * eps) for a, b in zip(*out)]

    # ------------------------------------------------------------------ the step
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor],
        val_closure: Callable[[], Tensor] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """One step; returns the training loss the closure computed (detached, unscaled).

        Every gradient and Hessian product is formed before anything changes, so that a step
        skipped for inf/NaN values (``scaler`` or ``skip_nonfinite``) leaves the weights, the
        tangents, the buffers and the LR state as they were, decided on the device.
        """
        if closure is None:
            raise ValueError("MARTHE/RTHO need a closure returning the training loss")
        groups = [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        check_state_matches_params(type(self).__name__, params, self.state)
        if not params:
            return self._training_grads(closure, params, graph=False)[0]
        scale = self._loss_scale(scaler, params[0].device)
        needs_hvp = any(self._needs_hvp(g, ps) for g, ps in groups)
        autograd_hvp = needs_hvp and any(g["hvp"] == "autograd" for g, _ in groups)
        loss, grads = self._training_grads(closure, params, graph=autograd_hvp, scale=scale)
        world = self._world()
        # The step uses the gradients averaged over ranks (as DDP would give them); `grads` keep
        # their graph for the Hessian product.
        step_grads = self._all_reduce_mean([g.detach() for g in grads], world)
        val_grads = None
        if val_closure is not None:
            val_grads = self._validation_grads(val_closure, params, scale)
            val_grads = self._all_reduce_mean(val_grads, world)
        hvps = self._hessian_products(groups, grads, closure, world, scale)
        found_inf = self.nonfinite_step = None
        if scale is not None or any(g["skip_nonfinite"] for g, _ in groups):
            # Unscaled copies (the gradients keep their graph untouched), checked in the same
            # pass; averaged over ranks already, so every rank takes the same decision.
            inv_scale = None if scale is None else scale.double().reciprocal().float()
            checked = [t.clone() for t in step_grads + (val_grads or []) + hvps]
            found_inf = nonfinite_check_(checked, inv_scale)
            n, m = len(step_grads), len(val_grads or [])
            step_grads, hvps = checked[:n], checked[n + m :]
            val_grads = checked[n : n + m] if val_grads is not None else None
            self.nonfinite_step = found_inf
        offset = 0
        for group, ps in groups:
            n = len(ps)
            group_slice = slice(offset, offset + n)
            offset += n
            if ps:
                self._step_group(
                    group, ps, step_grads[group_slice],
                    None if val_grads is None else val_grads[group_slice],
                    hvps[group_slice] if hvps else [], found_inf,
                )  # fmt: skip
        if scale is not None:
            self._record_found_inf(scaler, found_inf)
        return loss

    def _loss_scale(self, scaler, device: torch.device) -> Tensor | None:
        """GradScaler's current scale as a 0-dim float32 tensor on ``device`` (no host read), or
        None without an enabled scaler."""
        if scaler is None:
            return None
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if not scaler.is_enabled():
            return None
        from torch.amp.grad_scaler import OptState

        if scaler._per_optimizer_states[id(self)]["stage"] is not OptState.READY:
            raise RuntimeError(
                "MARTHE.step(scaler=...) was already called since the last scaler.update()"
            )
        return scaler.scale(torch.ones((), dtype=torch.float32, device=device))

    def _record_found_inf(self, scaler, found_inf: Tensor) -> None:
        """Hands the step's check to the scaler, as its own ``step`` would (GradScaler has no
        public entry for an optimizer that forms its own gradients), so that
        ``scaler.update()`` backs off or grows the scale."""
        from torch.amp.grad_scaler import OptState

        state = scaler._per_optimizer_states[id(self)]
        state["found_inf_per_device"] = {found_inf.device: found_inf}
        state["stage"] = OptState.STEPPED

    def _hessian_products(self, groups, grads, closure, world, scale) -> list[Tensor]:
        """H Z_w of the undamped tangent for every parameter, in the order of ``grads`` (zeros for
        groups that need none: Z_w is 0 on their first step, or mu is fixed at 0); an empty list
        when no group needs one. One double backward for all autograd groups."""
        spans, offset = [], 0
        for group, ps in groups:
            started = bool(ps) and all("z_param" in self.state.get(p, {}) for p in ps)
            spans.append((group, ps, slice(offset, offset + len(ps)), started and group["mu"] != 0))
            offset += len(ps)
        if not any(needed for *_, needed in spans):
            return []
        hvps: list[Tensor | None] = [None] * offset
        autograd = [(ps, s) for group, ps, s, needed in spans
                    if needed and group["hvp"] == "autograd"]  # fmt: skip
        if autograd:
            ps = [p for ps, _ in autograd for p in ps]
            indices = [i for _, s in autograd for i in range(s.start, s.stop)]
            z = [self.state[p]["z_param"] for p in ps]
            for i, h in zip(indices, self._hvp_autograd([grads[i] for i in indices], ps, z)):
                hvps[i] = h
        for group, ps, s, needed in spans:
            if needed and group["hvp"] == "finite_difference":
                z = [self.state[p]["z_param"] for p in ps]
                hvps[s] = self._hvp_finite_difference(closure, ps, z, group["fd_eps"], scale)
        params = [p for _, ps in groups for p in ps]
        hvps = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hvps)]
        return self._all_reduce_mean(hvps, world)

    def _needs_hvp(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        started = any("z_param" in self.state.get(p, {}) for p in params)
        return started and group["mu"] != 0

    def _init_state(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Zero tangents and buffers for every tensor (all of a group start together)."""
        inner = "sgd" if group["inner"] == "sgd" else "adam"
        _, dtype = group["learned_lr"].device, group["learned_lr"].dtype
        for p in params:
            state = self.state[p]
            state.clear()
            state["z_param"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self._direction_key(group) == "direction":
                state["direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if inner == "adam" or group["momentum"] != 0:
                for key in _BUFFERS[inner]:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if inner == "adam":
                state["step"] = torch.zeros((), dtype=dtype, device=p.device)

    @staticmethod
    def _direction_key(group: dict[str, Any]) -> str | None:
        """Where d_{t-1} is kept for MARTHE's adaptive mu: with plain SGD momentum the buffer is
        the direction (no copy); otherwise a "direction" state tensor; None without adaptive mu."""
        if group["mu"] != "adaptive":
            return None
        if group["inner"] == "sgd" and group["momentum"] != 0 and not group["nesterov"]:
            return "momentum_buffer"
        return "direction"

    def _objective(self, group, params, grads, val_grads) -> list[Tensor]:
        """grad E(w_t): the validation gradient, else the training objective's (L2 included)."""
        if val_grads is not None:
            return val_grads
        l2 = group["weight_decay"] if group["inner"] != "adamw" else 0.0
        return [g.add(p, alpha=l2) if l2 != 0 else g for g, p in zip(grads, params)]

    def _hyper_update(self, group, states, objective, implementation) -> None:
        """Steps 1, 5 and 6 of DESIGN.md §2: Delta_t, then mu, beta and eta, on the device."""
        lr, mu = group["learned_lr"], group["learned_mu"]
        dtype = lr.dtype

        def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
            if implementation == "fused":
                return fused_list_dot(a, b, dtype)
            return tensor_list_dot(a, b, dtype)

        delta = dot([s["z_param"] for s in states], objective)
        if group["mu"] == "adaptive":
            # g' = <B_{t-1}, grad E(w_t)> with B_{t-1} = -s_{t-1} d_{t-1}.
            key = self._direction_key(group)
            if all(key in s for s in states):
                directions = [s[key] for s in states]
                g_prime = -group["hd_prev_scale"] * dot(directions, objective)
            else:  # mu switched to "adaptive" mid-run: no d_{t-1} yet, g' = 0 (then mu = 0)
                g_prime = torch.zeros_like(delta)
            marthe_mu_(mu, group["mu_c"], delta, g_prime)
        beta = group["adapted_hyper_lr"]
        if group["hyper_hyper_lr"] != 0:
            beta.copy_(
                (beta + group["hyper_hyper_lr"] * delta * group["prev_hypergrad"]).clamp_min(0)
            )
        lr.copy_((lr - beta * delta).clamp_min(0))
        group["hypergrad"].copy_(delta)
        group["prev_hypergrad"].copy_(delta)

    def _step_group(self, group, params, step_grads, val_grads, hvps, found_inf) -> None:
        """Steps 1-6 of DESIGN.md §2 for one group. ``hvps``: H Z_w per tensor, or an empty list
        when none was needed (it counts as 0). ``found_inf`` (AMP / skip_nonfinite): when
        nonzero, every tensor the step writes is left with its bits (no host read)."""
        states = [self.state[p] for p in params]
        started = all("z_param" in s for s in states)
        algorithm = self._algorithm_of(group["inner"])
        implementation = choose_implementation(
            params, foreach=None, fused=group["fused"], algorithm=algorithm
        )
        if found_inf is not None:
            found_inf = found_inf.to(group["learned_lr"].device)
        guard = FoundInfGuard(found_inf, [[group[key] for key in _GROUP_TENSORS]])
        lr_scale = _lr_scale(group)
        with torch.no_grad():
            if started:
                objective = self._objective(group, params, step_grads, val_grads)
                self._hyper_update(group, states, objective, implementation)
            else:
                self._init_state(group, params)
            self._inner_step(group, params, step_grads, hvps, states, lr_scale, started,
                             implementation, found_inf)  # fmt: skip
            group["effective_lr"].copy_(group["learned_lr"] * lr_scale)
            guard.restore()
            group["hd_prev_scale"] = lr_scale

    def _inner_step(self, group, params, grads, hvps, states, lr_scale, started, implementation,
                    found_inf):  # fmt: skip
        """The inner step and the tangent update of every state buffer (one fused pass, or the
        reference with the same signature)."""
        lr, mu = group["learned_lr"], group["learned_mu"]
        z_params = [s["z_param"] for s in states]
        # d_t only for MARTHE's adaptive mu (g' = -s <d_{t-1}, grad E>) where no buffer holds it;
        # a group switched to adaptive mu mid-run starts from d = 0.
        directions = []
        if self._direction_key(group) == "direction":
            for s, p in zip(states, params):
                if "direction" not in s:
                    s["direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                directions.append(s["direction"])
        fused = implementation == "fused"
        if group["inner"] == "sgd":
            has_buffer = group["momentum"] != 0
            buffers = [s["momentum_buffer"] for s in states] if has_buffer else []
            z_buffers = [s["z_buffer"] for s in states] if has_buffer else []
            step = fused_sgd_tangent_step_ if fused else sgd_tangent_step_
            step(
                params, grads, hvps, buffers, z_params, z_buffers, directions,
                lr=lr, mu=mu, lr_scale=lr_scale, momentum=group["momentum"],
                dampening=group["dampening"], nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], first_step=not started, found_inf=found_inf,
            )  # fmt: skip
            return
        steps = [s["step"] for s in states]
        step_guard = FoundInfGuard(found_inf, [steps])
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        step = fused_adam_tangent_step_ if fused else adam_tangent_step_
        step(
            params, grads, hvps,
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], z_params,
            [s["z_exp_avg"] for s in states], [s["z_exp_avg_sq"] for s in states], directions,
            lr=lr, mu=mu, step=steps[0], lr_scale=lr_scale, beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["inner"] == "adamw", found_inf=found_inf,
        )  # fmt: skip
        step_guard.restore()

    # ------------------------------------------------------------------ selecting beta
    @classmethod
    def find_hyper_lr(
        cls,
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
        **kwargs: Any,
    ) -> float:
        """The paper's selection of the hyper-LR (end of its section 4): start high and divide by
        ``factor`` until a short run of ``steps`` steps does not diverge; return that value.

        ``params`` are restored after every trial (the call leaves them as it found them);
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
        saved = [p.detach().clone() for p in params]
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
                    for p, s in zip(params, saved):
                        p.copy_(s)
                history = torch.stack(losses).double()
                tail = history[-max(1, steps // 10) :]
                finite = len(losses) == steps and bool(torch.isfinite(history).all())
                if finite and float(tail.mean()) <= divergence_ratio * float(history[0]):
                    return value
                value /= factor
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        raise RuntimeError(
            f"find_hyper_lr: every {argument} from {start} down to {smallest} diverged within "
            f"{steps} steps; lower start or smallest, or check the closure"
        )


class RTHO(MARTHE):
    """Real-time hyperparameter optimisation of the LR (Franceschi et al.): MARTHE with mu = 1
    and a fixed hyper-LR. With ``step(closure, val_closure=...)`` it is RT-HPO."""

    def __init__(self, params, lr: float = 0.0, hyper_lr: float = 1e-3, **kwargs: Any) -> None:
        for name in ("mu", "hyper_hyper_lr"):
            if name in kwargs:
                raise ValueError(f"RTHO fixes {name}; use MARTHE to set it")
        super().__init__(params, lr, hyper_lr, mu=1.0, hyper_hyper_lr=0.0, **kwargs)
