"""Shared machinery of the HD optimizers: argument checks, the learned-LR state, the scheduler
scale, validation gradients and a lossless state_dict.

Where things live (docs/design.md, "Public API and state"):

- ``group["lr"]`` keeps its torch.optim meaning, a float that schedulers write. The step uses
  ``effective LR = learned LR * group["lr"] / group["initial_lr"]`` (scale 1 when initial_lr is 0).
- Per group: ``learned_lr`` (0-dim, or one entry per tensor with ``per_tensor=True``),
  ``hypergrad`` (dE/d eta of the last step) and ``effective_lr`` (the LR the last step applied), all
  device tensors in float32 (float64 for float64 parameters); with ``hyper_optimizer="adam"``
  ``hyper_adam_state`` (the Adam state of log eta, 4 values per slot: optim/_hyper_optimizer.py);
  ``hd_prev_scale`` (s_{t-1}) and ``hd_stale`` (indices of tensors that were skipped at the last
  step, whose d_{t-1} is 0).
- Per parameter: the inner optimizer's buffers, as in torch.optim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hyperlr_ext._common.checks import (
    check_bool,
    check_choice,
    check_number,
    check_optional_bool,
    check_tensor_lr,
)
from hyperlr_ext._common.devices import hyper_device_dtype, placed_like_params
from hyperlr_ext._dispatch import check_fused_params, check_fused_request
from hyperlr_ext.functional._hd_rule import nonfinite_check_
from hyperlr_ext.optim._hyper_optimizer import (
    check_lr_in_bounds,
    count_warmup_step,
    ensure_adam_state,
    group_warmup_factor,
    log_lr_adam,
)
from hyperlr_ext.optim._lr_learner import LRLearner
from hyperlr_ext.optim._state_check import check_state_matches_params

__all__ = ["HDOptimizer"]

_GROUP_TENSORS = ("learned_lr", "hypergrad", "effective_lr")


def check_hd_arguments(
    *,
    lr: float,
    hyper_lr: float,
    weight_decay: float,
    multiplicative: bool,
    per_tensor: bool,
    lr_lag: int,
    maximize: bool,
    foreach: bool | None,
    fused: bool | None,
    differentiable: bool,
    capturable: bool,
    algorithm: str,
) -> None:
    """Checks common to every HD optimizer; run before ``params`` is touched."""
    check_tensor_lr(lr, foreach=foreach, capturable=capturable)
    check_number("lr", lr, label="learning rate")
    check_number("hyper_lr", hyper_lr)
    check_number("weight_decay", weight_decay)
    check_bool("multiplicative", multiplicative)
    check_bool("per_tensor", per_tensor)
    check_choice("lr_lag", lr_lag, (0, 1))
    check_bool("maximize", maximize)
    check_optional_bool("foreach", foreach)
    check_optional_bool("fused", fused)
    check_bool("capturable", capturable)
    if check_bool("differentiable", differentiable):
        raise ValueError(
            "Invalid differentiable value: True; differentiable must be False: hyperlr_ext "
            "optimizers learn the LR online and do not support differentiating through step()"
        )
    check_fused_request(algorithm, foreach, fused)


def _lr_scale(group: dict[str, Any]) -> float:
    """s_t = group["lr"] / group["initial_lr"]: how much a scheduler scales the learned LR, times
    the built-in warm-up's factor while it lasts (``lr_warmup``)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        raise TypeError(
            "param_group['lr'] became a Tensor; hyperlr_ext optimizers need it to stay a float "
            "(the learned LR is already a device tensor)"
        )
    initial = group.get("initial_lr", lr)
    scale = 1.0 if initial == 0 else lr / initial
    return scale * group_warmup_factor(group)


def _initial_lr(group: dict[str, Any]) -> float:
    """eta_0: the group's initial LR (its LR when that is 0)."""
    return float(group["initial_lr"]) if group["initial_lr"] != 0 else float(group["lr"])


class HDOptimizer(LRLearner):
    """Base class of the HD optimizers. Subclasses implement ``_step_group``."""

    _algorithm = "hd"
    # Group keys every state_dict of the subclass has, and the per-parameter state it keeps
    # (load_state_dict refuses others: _state_check.py).
    _IDENTITY_KEYS: tuple[str, ...] = ("hyper_lr", "lr_lag")
    _STRUCTURAL_KEYS = ("per_tensor", "hyper_optimizer")

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        # torch.amp.GradScaler then hands the step its scale and found_inf as device tensors
        # (self.grad_scale / self.found_inf) instead of unscaling and syncing on found_inf: the
        # fused kernels unscale on the fly and skip a step with inf/NaN gradients on the device.
        self._step_supports_amp_scaling = bool(defaults.get("fused"))

    # ------------------------------------------------------------------ param groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        group.setdefault("initial_lr", group["lr"])
        self._init_hyper_state(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Check settings a param group may override, and that its params share one device."""
        check_tensor_lr(group["lr"], foreach=group["foreach"], capturable=group["capturable"])
        check_number("lr", group["lr"], label="learning rate")
        check_number("hyper_lr", group["hyper_lr"])
        check_choice("lr_lag", group["lr_lag"], (0, 1))
        if group.get("hyper_optimizer", "sgd") != self.defaults.get("hyper_optimizer", "sgd"):
            raise ValueError(
                f"Invalid hyper_optimizer value in a param group: {group['hyper_optimizer']!r}; "
                "hyper_optimizer is set for the whole optimizer "
                f"({self.defaults.get('hyper_optimizer', 'sgd')!r}), not per group"
            )
        if group.get("hyper_optimizer") == "adam":
            check_lr_in_bounds(group["lr"], group["lr_bounds"])
        devices = {p.device for p in group["params"]}
        if group["fused"]:
            if any(p.is_meta for p in group["params"]):
                # Deferred initialisation: checked at step(), once the params are real.
                self._fused_check_deferred = True
            else:
                check_fused_params(self._algorithm, group["params"])
        if len(devices) > 1:
            raise ValueError(
                f"all parameters of a param group must be on one device (its learned LR lives "
                f"there), got {sorted(str(d) for d in devices)}; put them in separate groups"
            )

    @staticmethod
    def _hyper_device_dtype(group: dict[str, Any]) -> tuple[torch.device, torch.dtype]:
        return hyper_device_dtype(group["params"])

    def _init_hyper_state(self, group: dict[str, Any]) -> None:
        device, dtype = self._hyper_device_dtype(group)
        shape = (len(group["params"]),) if group["per_tensor"] else ()
        group["learned_lr"] = torch.full(shape, _initial_lr(group), dtype=dtype, device=device)
        group["hypergrad"] = torch.zeros(shape, dtype=dtype, device=device)
        group["effective_lr"] = torch.full(shape, float(group["lr"]), dtype=dtype, device=device)
        group.pop("hyper_adam_state", None)
        ensure_adam_state(group, shape, device, dtype)
        group["hd_prev_scale"] = 1.0
        group["hd_stale"] = []

    def _ensure_hyper_state(self, group: dict[str, Any]) -> None:
        """Create missing hyper-state and keep it on the params' device (no value is read)."""
        if any(key not in group for key in _GROUP_TENSORS):
            group.setdefault("initial_lr", group["lr"])
            self._init_hyper_state(group)
            return
        device, dtype = self._hyper_device_dtype(group)
        expected = (len(group["params"]),) if group["per_tensor"] else ()
        initial = {"learned_lr": _initial_lr(group), "hypergrad": 0.0, "effective_lr": group["lr"]}
        for key in _GROUP_TENSORS:
            value = group[key]
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"param_group[{key!r}] has shape {tuple(value.shape)} but per_tensor="
                    f"{group['per_tensor']} with {len(group['params'])} params needs {expected}"
                )
            group[key] = placed_like_params(value, device, dtype, initial[key])
        ensure_adam_state(group, expected, device, dtype)
        group.setdefault("hd_prev_scale", 1.0)
        group.setdefault("hd_stale", [])

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fill in settings missing from older state_dicts; a Python-number ``step`` (as saved
        by torch < 1.12) becomes a device tensor in the LR's dtype."""
        super().__setstate__(state)
        self._step_supports_amp_scaling = bool(self.defaults.get("fused"))
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            _, dtype = self._hyper_device_dtype(group)
            for p in group["params"]:
                param_state = self.state.get(p, {})
                step = param_state.get("step")
                if step is not None and not isinstance(step, Tensor):
                    param_state["step"] = torch.tensor(float(step), dtype=dtype, device=p.device)

    def _ensure_group_state(self, group: dict[str, Any]) -> None:
        self._ensure_hyper_state(group)

    def _after_load(self, state_dict: dict[str, Any]) -> None:
        """torch casts floating per-parameter state to the parameter's dtype and, for fused or
        capturable groups, ``step`` to float32; our ``step`` counts stay in the LR's dtype
        (float64 for float64 params, else float32)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        dtypes = [self._hyper_device_dtype(g)[1] for g in self.param_groups for _ in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for param_id, param, dtype in zip(saved_ids, params, dtypes):
            saved = saved_state.get(param_id, {})
            step = saved.get("step")
            if isinstance(step, Tensor):
                self.state[param]["step"] = step.to(device=param.device, dtype=dtype, copy=True)

    # ------------------------------------------------------------------ the step
    def _validation_grads(
        self, val_closure: Callable[[], Tensor] | None
    ) -> dict[Tensor, Tensor] | None:
        """Gradients of the validation objective E at the current weights, keyed by param."""
        if val_closure is None:
            return None
        params = [
            p
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and p.requires_grad
        ]
        with torch.enable_grad():
            val_loss = val_closure()
        if not isinstance(val_loss, Tensor) or val_loss.numel() != 1:
            raise ValueError(
                "val_closure must return the validation loss as a scalar tensor, got "
                f"{type(val_loss).__name__}"
                + (f" of shape {tuple(val_loss.shape)}" if isinstance(val_loss, Tensor) else "")
            )
        if not val_loss.requires_grad:
            raise ValueError(
                "val_closure returned a loss that does not require grad; compute it from the "
                "parameters with autograd enabled and do not call backward() on it"
            )
        with torch.enable_grad():
            grads = torch.autograd.grad(val_loss.reshape(()), params, allow_unused=True)
        return {p: (torch.zeros_like(p) if g is None else g) for p, g in zip(params, grads)}

    def _check_grads(self) -> None:
        """Reject what the step cannot do before anything is modified."""
        for group in self.param_groups:
            _lr_scale(group)
            check_state_matches_params(
                type(self).__name__, group["params"], self.state, self._placed_state_keys()
            )
            if group["fused"] and getattr(self, "_fused_check_deferred", False):
                check_fused_params(self._algorithm, group["params"])
            for p in group["params"]:
                grad = p.grad
                if grad is None or not (
                    grad.layout != torch.strided or grad.dtype.is_complex or p.dtype.is_complex
                ):
                    continue
                if grad.layout != torch.strided:  # COO, CSR/CSC/BSR, nested (jagged)
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (got layout "
                        f"{grad.layout}); only dense (strided) gradients are supported"
                    )
                if grad.dtype.is_complex or p.dtype.is_complex:
                    raise ValueError(
                        f"{type(self).__name__} does not support complex parameters or "
                        "gradients; optimise torch.view_as_real(param) instead"
                    )

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        val_closure: Callable[[], Tensor] | None = None,
    ) -> Any:
        """Take one optimisation step.

        Args:
            closure: optional; re-evaluates the model and returns the loss (it may call backward,
                as Lightning's and accelerate's closures do); called before gradients are read.
            val_closure: optional; returns a validation loss (no backward) whose gradient at the
                current weights replaces the training gradient in the hypergradient: the
                "First-order (Val)" variant.
        Returns:
            the closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        self._fused_check_deferred = False  # every fused group's params passed the check
        objective_grads = self._validation_grads(val_closure)
        # Set by torch.amp.GradScaler.step around this call when _step_supports_amp_scaling.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None and any(g.get("skip_nonfinite") for g in self.param_groups):
            found_inf = self._nonfinite_flag()
        # This step's skip flag (GradScaler's or ours) for schedulers that read it (MLR-SNet).
        self.nonfinite_step = found_inf
        self._amp = {"grad_scale": getattr(self, "grad_scale", None), "found_inf": found_inf}
        try:
            for group in self.param_groups:
                self._step_group(group, objective_grads)
        finally:
            self._amp = {}
        return loss

    def _nonfinite_flag(self) -> Tensor | None:
        """``skip_nonfinite``: a float32 flag on the device, nonzero when a gradient holds inf or
        NaN; every path then skips the step as it does for GradScaler (weights, state and LR
        keep their bits). One fused pass over the gradients (torch's own non-finite check, with a
        scale of 1), no host sync. ``step`` keeps it as ``self.nonfinite_step``."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return nonfinite_check_(grads) if grads else None

    def _gather(self, group: dict[str, Any]) -> tuple[list[int], list[Tensor]]:
        """Indices and params of the group that have a gradient this step."""
        indices = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        return indices, [group["params"][i] for i in indices]

    def _slots(self, group: dict[str, Any], indices: list[int]):
        """(lrs, hypergrads, effective_lrs) as lists of 0-dim views for the stepped tensors."""
        self._ensure_hyper_state(group)
        if not group["per_tensor"]:
            return [group["learned_lr"]], [group["hypergrad"]], [group["effective_lr"]]
        return tuple(
            [views[i] for i in indices]
            for views in (group[key].unbind(0) for key in _GROUP_TENSORS)
        )

    def _has_previous(self, group: dict[str, Any], indices: list[int], fresh: list[bool]):
        stale = group.get("hd_stale")
        if not stale:
            return [not new for new in fresh]
        stale = set(stale)
        return [not new and i not in stale for i, new in zip(indices, fresh)]

    def _finish_group(self, group: dict[str, Any], indices: list[int], lr_scale: float) -> None:
        group["hd_prev_scale"] = lr_scale
        count_warmup_step(group, group.get("lr_warmup", 0))
        if len(indices) == len(group["params"]):  # every tensor stepped: none is stale
            group["hd_stale"] = []
            return
        stepped = set(indices)
        group["hd_stale"] = [
            i
            for i, p in enumerate(group["params"])
            if i not in stepped and len(self.state.get(p, {})) > 0
        ]

    def _step_group(self, group: dict[str, Any], objective_grads) -> None:  # pragma: no cover
        raise NotImplementedError

    def _log_lr_adam(self, group: dict[str, Any], indices: list[int]):
        """The Adam step on log eta of the stepped tensors' slots (None for "sgd")."""
        if group.get("hyper_optimizer") != "adam":
            return None
        state = group["hyper_adam_state"]
        states = [state] if not group["per_tensor"] else [state[i] for i in indices]
        return log_lr_adam(group, states)

    def _hd_kwargs(self, group: dict[str, Any], indices: list[int], lr_scale: float,
                   reducer) -> dict[str, Any]:  # fmt: skip
        """The keywords every functional HD step takes from the group (DTensor groups, which
        have a ``reducer``, step on the pure-PyTorch for-loop)."""
        sharded = reducer is not None
        return dict(
            log_lr_adam=self._log_lr_adam(group, indices),
            foreach=False if sharded else group["foreach"],
            fused=False if sharded else group["fused"],
            lr_scale=lr_scale,
            prev_lr_scale=group["hd_prev_scale"],
            hyper_lr=group["hyper_lr"],
            weight_decay=group["weight_decay"],
            multiplicative=group["multiplicative"],
            lr_lag=group["lr_lag"],
            maximize=group["maximize"],
            sum_reducer=reducer,
            **self._amp,
        )

    def _objective_list(self, objective_grads, params: list[Tensor]) -> list[Tensor] | None:
        if objective_grads is None:
            return None
        return [objective_grads[p] if p in objective_grads else torch.zeros_like(p) for p in params]
