"""MARTHE and RTHO: the LR learned from forward-mode (tangent) hypergradients.

Equations: DESIGN.md §2 "Tangent-system methods" and hyperlr_ext/functional/marthe.py. RTHO is
MARTHE with mu = 1 and a fixed hyper-LR; with ``val_closure`` it is RT-HPO; mu = 0 is HD.
This version implements the SGD inner dynamics (momentum, dampening, Nesterov, L2 decay).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from hyperlr_ext.functional.marthe import marthe_mu_, sgd_tangent_step_, tensor_list_dot
from hyperlr_ext.optim._checks import check_bool, check_choice, check_number
from hyperlr_ext.optim._hd_base import _lr_scale

__all__ = ["MARTHE", "RTHO"]


class MARTHE(Optimizer):
    """SGD whose LR follows the tangent hypergradient (Donini et al., MARTHE).

    Args:
        params: parameters or param groups.
        lr: initial learned LR eta_0 (>= 0).
        hyper_lr: beta_0, the hyper-LR (>= 0).
        inner: the inner optimizer; ``"sgd"`` (torch.optim.SGD's dynamics).
        momentum, dampening, nesterov, weight_decay: as torch.optim.SGD.
        mu: ``"adaptive"`` (MARTHE's rule) or a fixed number in [0, 1] (1: RTHO, 0: HD).
        hyper_hyper_lr: beta', the step of HD on beta (0 keeps beta fixed).
        hvp: ``"autograd"`` (double backward) or ``"finite_difference"`` (two extra gradient
            evaluations at w +- eps Z, for models without double-backward support).
        fd_eps: the relative step of the finite difference.

    ``step(closure, val_closure=None)``: ``closure()`` returns the training loss on the current
    batch and must not call ``backward()``; ``val_closure()`` optionally returns a validation loss
    (the objective E). Each group exposes device tensors ``learned_lr``, ``effective_lr``,
    ``hypergrad`` (Delta = dE/d eta), ``learned_mu`` (mu) and ``adapted_hyper_lr`` (beta).
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
        weight_decay: float = 0.0,
        mu: str | float = "adaptive",
        hyper_hyper_lr: float = 0.0,
        hvp: str = "autograd",
        fd_eps: float = 1e-4,
    ) -> None:
        check_number("lr", lr, label="learning rate")
        check_number("hyper_lr", hyper_lr)
        check_number("hyper_hyper_lr", hyper_hyper_lr)
        check_number("momentum", momentum)
        check_number("dampening", dampening, high=1.0, high_inclusive=True)
        check_number("weight_decay", weight_decay)
        check_number("fd_eps", fd_eps, low=0.0)
        check_bool("nesterov", nesterov)
        check_choice("hvp", hvp, ("autograd", "finite_difference"))
        check_choice("inner", inner, ("sgd", "adam"))
        if inner != "sgd":
            raise ValueError(
                "inner='adam' is not available yet in this version of MARTHE/RTHO; inner must "
                "be 'sgd' (use AdamHD for the Adam dynamics with the HD rule)"
            )
        if mu != "adaptive":
            check_number("mu", mu, high=1.0, high_inclusive=True)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={momentum}, dampening={dampening})"
            )
        defaults = dict(
            lr=lr, hyper_lr=hyper_lr, momentum=momentum, dampening=dampening,
            nesterov=nesterov, weight_decay=weight_decay, mu=mu, hyper_hyper_lr=hyper_hyper_lr,
            hvp=hvp, fd_eps=fd_eps, inner=inner,
        )  # fmt: skip
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._init_group(self.param_groups[-1])

    @staticmethod
    def _init_group(group: dict[str, Any]) -> None:
        params = group["params"]
        device = params[0].device if params else torch.device("cpu")
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        group.setdefault("initial_lr", group["lr"])

        def full(value: float) -> Tensor:
            return torch.full((), float(value), dtype=dtype, device=device)

        group.setdefault("learned_lr", full(group["lr"]))
        group.setdefault("effective_lr", full(group["lr"]))
        group.setdefault("hypergrad", full(0.0))
        group.setdefault("prev_hypergrad", full(0.0))
        group.setdefault("learned_mu", full(0.0 if group["mu"] == "adaptive" else group["mu"]))
        group.setdefault("mu_c", full(0.0))
        group.setdefault("adapted_hyper_lr", full(group["hyper_lr"]))
        group.setdefault("hd_prev_scale", 1.0)

    # ------------------------------------------------------------------ step
    def _training_grads(self, closure: Callable[[], Tensor], params: list[Tensor], graph: bool):
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
            grads = torch.autograd.grad(
                loss.reshape(()), params, create_graph=graph, allow_unused=True
            )
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return loss.detach(), grads

    def _hvp_autograd(self, grads: list[Tensor], params: list[Tensor], z: list[Tensor]):
        # A once_differentiable op leaves an error node in the gradient's graph, which autograd
        # skips silently with allow_unused: refuse it here rather than use a zero Hessian.
        if any(type(g.grad_fn).__name__ in ("Error", "DelayedError") for g in grads):
            raise RuntimeError(
                "MARTHE/RTHO need the Hessian-vector product, but the loss goes through an op "
                "without double backward (once_differentiable); pass "
                'hvp="finite_difference"'
            )
        try:
            with torch.enable_grad():
                out = torch.autograd.grad(
                    grads, params, grad_outputs=z, retain_graph=True, allow_unused=True
                )
        except RuntimeError as error:
            raise RuntimeError(
                "MARTHE/RTHO could not differentiate the gradient a second time (the Hessian-"
                "vector product); this model may not support double backward: pass "
                f'hvp="finite_difference". Original error: {error}'
            ) from error
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, out)]

    def _hvp_finite_difference(self, closure, params, z, fd_eps):
        """H z ~ (g(w + e z) - g(w - e z)) / (2 e), e = fd_eps / max(|z|, tiny) (no host sync)."""
        dtype = params[0].dtype
        norm = torch.sqrt(tensor_list_dot(z, z, dtype)).clamp_min(torch.finfo(dtype).tiny)
        eps = fd_eps / norm
        out = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, v in zip(params, z):
                    p.add_(sign * eps * v)
            _, g = self._training_grads(closure, params, graph=False)
            with torch.no_grad():
                for p, v in zip(params, z):
                    p.sub_(sign * eps * v)
            out.append(g)
        return [(a - b) / (2 * eps) for a, b in zip(*out)]

    def step(  # type: ignore[override]
        self, closure: Callable[[], Tensor], val_closure: Callable[[], Tensor] | None = None
    ) -> Tensor:
        """One step; returns the training loss the closure computed (detached)."""
        if closure is None:
            raise ValueError("MARTHE/RTHO need a closure returning the training loss")
        groups = [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        needs_hvp = any(self._needs_hvp(g, ps) for g, ps in groups)
        autograd_hvp = needs_hvp and any(g["hvp"] == "autograd" for g, _ in groups)
        loss, grads = self._training_grads(closure, params, graph=autograd_hvp)
        val_grads = None
        if val_closure is not None:
            with torch.enable_grad():
                val_loss = val_closure()
                val_grads = torch.autograd.grad(val_loss.reshape(()), params, allow_unused=True)
            val_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, val_grads)]
        offset = 0
        for group, ps in groups:
            n = len(ps)
            group_grads = grads[offset : offset + n]
            group_val = None if val_grads is None else val_grads[offset : offset + n]
            offset += n
            if ps:
                self._step_group(group, ps, group_grads, group_val, closure)
        return loss

    def _needs_hvp(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        started = any("z_param" in self.state.get(p, {}) for p in params)
        return started and group["mu"] != 0

    def _step_group(self, group, params, grads, val_grads, closure) -> None:
        states = [self.state[p] for p in params]
        started = all("z_param" in s for s in states)
        lr_scale = _lr_scale(group)
        lr, mu = group["learned_lr"], group["learned_mu"]
        wd = group["weight_decay"]
        with torch.no_grad():
            detached = [g.detach() for g in grads]
            objective = val_grads or [
                g.add(p, alpha=wd) if wd != 0 else g for g, p in zip(detached, params)
            ]
            if started:
                dtype = lr.dtype
                z_params = [s["z_param"] for s in states]
                delta = tensor_list_dot(z_params, objective, dtype)
                if group["mu"] == "adaptive":
                    # g' = <B_{t-1}, grad E(w_t)> with B_{t-1} = -s_{t-1} d_{t-1}.
                    directions = [s["direction"] for s in states]
                    g_prime = -group["hd_prev_scale"] * tensor_list_dot(
                        directions, objective, dtype
                    )
                    marthe_mu_(mu, group["mu_c"], delta, g_prime)
                beta = group["adapted_hyper_lr"]
                if group["hyper_hyper_lr"] != 0:
                    beta.copy_(
                        (
                            beta + group["hyper_hyper_lr"] * delta * group["prev_hypergrad"]
                        ).clamp_min(0)
                    )
                lr.copy_((lr - beta * delta).clamp_min(0))
                group["hypergrad"].copy_(delta)
                group["prev_hypergrad"].copy_(delta)
        hvps = None
        if started and group["mu"] != 0:
            z = [s["z_param"] * mu for s in states]
            if group["hvp"] == "autograd":
                hvps = self._hvp_autograd(grads, params, z)
            else:
                hvps = self._hvp_finite_difference(closure, params, z, group["fd_eps"])
        with torch.no_grad():
            buffers = [s.get("momentum_buffer") for s in states]
            z_buffers = [s.get("z_buffer") for s in states]
            z_params = [s.get("z_param", torch.zeros_like(p)) for s, p in zip(states, params)]
            directions = [s.get("direction", torch.zeros_like(p)) for s, p in zip(states, params)]
            sgd_tangent_step_(
                params, detached, hvps, buffers, z_params, z_buffers, directions,
                lr=lr, lr_scale=lr_scale, mu=mu if started else 0.0,
                momentum=group["momentum"], dampening=group["dampening"],
                nesterov=group["nesterov"], weight_decay=wd,
            )  # fmt: skip
            for s, b, zb, zp, d in zip(states, buffers, z_buffers, z_params, directions):
                s["z_param"], s["direction"] = zp, d
                if b is not None:
                    s["momentum_buffer"], s["z_buffer"] = b, zb
            group["effective_lr"].copy_(lr * lr_scale)
            group["hd_prev_scale"] = lr_scale


class RTHO(MARTHE):
    """Real-time hyperparameter optimisation of the LR (Franceschi et al.): MARTHE with mu = 1
    and a fixed hyper-LR. With ``step(closure, val_closure=...)`` it is RT-HPO."""

    def __init__(self, params, lr: float = 0.0, hyper_lr: float = 1e-3, **kwargs: Any) -> None:
        for name in ("mu", "hyper_hyper_lr"):
            if name in kwargs:
                raise ValueError(f"RTHO fixes {name}; use MARTHE to set it")
        super().__init__(params, lr, hyper_lr, mu=1.0, hyper_hyper_lr=0.0, **kwargs)
