"""HyperLR: hypergradient descent on the LR of any torch.optim optimizer, by a pair of step hooks.

Baydin et al.'s rule needs the previous update direction only, and that can be read off the
weights: the step before t moved them by ``w_{t-1} - w_t = s_{t-1} eta_{t-1} d_{t-1}`` whatever
the optimizer computed (momentum, Adam's ratio, Adafactor's factored second moment, a sign).
Before each step the pre-hook forms h_t = <g_hat_t, s_{t-1} d_{t-1}> from the gradients and a
snapshot of the weights (one pass: hyperlr_ext/functional/hyper_lr.py), updates the learned LR
and writes ``group["lr"]``, which then holds the LR this step applies; the post-hook puts the
scheduled value back, so that torch's LR schedulers keep scaling what is learned (docs/design.md,
HyperLR).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from hyperlr_ext._common.checks import check_bool, check_choice, check_optional_bool
from hyperlr_ext._common.devices import hyper_device_dtype
from hyperlr_ext._common.sharded import distribute_like, local_shards, mesh_group, sum_reducer
from hyperlr_ext._dispatch import check_fused_params, check_fused_request, choose_implementation
from hyperlr_ext.functional.hyper_lr import hyper_lr_rule_, pass_implementation
from hyperlr_ext.optim._hyper_optimizer import (
    check_lr_in_bounds,
    count_warmup_step,
    hyper_settings,
    initial_adam_state,
    log_lr_adam,
    warmup_factor,
)
from hyperlr_ext.optim._lr_learner import LRLearner

__all__ = ["HyperLR"]

_ATTRIBUTE = "_hyperlr_ext_hyper_lr"  # the wrapper of an optimizer, set while it is attached
STATE_KEY = "hyperlr_ext.HyperLR"  # where the optimizer's state_dict carries the wrapper's

# Optimizers whose ``weight_decay`` is an L2 term of the objective (added to the gradient), and
# those whose decay is decoupled (applied to the weights); a group's own
# ``decoupled_weight_decay`` key, where torch has one, decides first.
_L2_DECAY = ("SGD", "Adam", "Adamax", "Adagrad", "Adadelta", "RMSprop", "NAdam", "RAdam", "ASGD")
_DECOUPLED_DECAY = ("AdamW", "Adafactor")
_GROUP_TENSORS = ("learned_lr", "prev_lr", "hypergrad", "effective_lr")


def _objective_decay(optimizer: Optimizer, group: dict[str, Any], decoupled: bool | None) -> float:
    """lambda of the L2 term the objective's gradient g_hat includes (0 for decoupled decay)."""
    weight_decay = float(group.get("weight_decay", 0.0) or 0.0)
    if weight_decay == 0:
        return 0.0
    if decoupled is None:
        decoupled = group.get("decoupled_weight_decay")
    if decoupled is None:
        name = type(optimizer).__name__
        if name in _DECOUPLED_DECAY:
            decoupled = True
        elif name in _L2_DECAY and type(optimizer).__module__.startswith("torch.optim"):
            decoupled = False
        else:
            raise ValueError(
                f"HyperLR cannot tell whether {name}'s weight_decay is an L2 term of the "
                "objective (added to the gradient) or decoupled (applied to the weights); pass "
                "decoupled_weight_decay=True or False"
            )
    return 0.0 if decoupled else weight_decay


def _scale(scheduled: float | Tensor, initial: float | Tensor) -> float | Tensor:
    """s_t = group["lr"] / group["initial_lr"] (1 where the initial LR is 0), on the device for
    tensor LRs (no host read)."""
    if isinstance(initial, Tensor) or isinstance(scheduled, Tensor):
        initial = torch.as_tensor(initial)
        ratio = torch.as_tensor(scheduled) / torch.where(initial != 0, initial, 1.0)
        return torch.where(initial != 0, ratio, 1.0)
    return 1.0 if initial == 0 else scheduled / initial


def _read_ahead(value: Tensor) -> tuple[Tensor, Any]:
    """Starts copying a 0-dim device value to the host without waiting for it (CUDA: into pinned
    memory behind an event); :func:`_host_value` reads it later, when it is long computed."""
    if value.device.type != "cuda":
        return value.detach().clone(), None
    host = torch.empty((), dtype=value.dtype, pin_memory=True)
    host.copy_(value.detach(), non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _host_value(ahead: tuple[Tensor, Any] | float) -> float:
    if isinstance(ahead, float):
        return ahead
    host, event = ahead
    if event is not None:
        event.synchronize()
    return float(host)


class HyperLR:
    """Learns the LR of ``optimizer`` by hypergradient descent, through its step hooks.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, fused AdamW, Adafactor, Lion, ...);
            not one of ours, which learn their LR already.
        hyper_lr: beta >= 0. The scale of h = <g, d> is the optimizer's: about 1e-3 for SGD and
            1e-7 for Adam-like directions (whose entries are about 1) are where to start.
            Required with ``hyper_optimizer="sgd"``; the robust preset's by default with
            ``"adam"``.
        multiplicative: the multiplicative rule eta <- eta (1 + beta h / (|g||d|)) instead of the
            additive eta <- max(eta + beta h, 0).
        per_tensor: one learned LR per parameter tensor: the optimizer steps with the group's
            largest and the post-hook scales each tensor's update by eta_i / eta_max (exact for
            optimizers whose update is proportional to the LR and whose state does not depend
            on it: SGD, Adam, AdamW, RMSprop, Lion, ...).
        lr_lag: 0 (default) applies the LR learned from step t's gradient at step t; 1 applies
            it from step t + 1 (with a float ``group["lr"]`` on a GPU, its host copy is then made
            asynchronously one step ahead: no stall).
        decoupled_weight_decay: whether the optimizer's ``weight_decay`` is decoupled (then not
            part of the objective's gradient) or an L2 term (added to it); None infers it for
            torch's optimizers and asks for it otherwise.
        hyper_optimizer, hyper_betas, hyper_eps, lr_bounds, lr_warmup: ``"sgd"`` (the default:
            the rule above) or ``"adam"``, an Adam step on log eta whose hyper-arguments default
            to the robust preset (as in :class:`hyperlr_ext.SGDHD`, warm-up included); the
            initial LR must lie in ``lr_bounds``.
        foreach, fused: the implementation of the pre-step pass (hyperlr_ext._dispatch: the
            compiled one-pass kernel where it is the default, ``torch._foreach_*`` ops, or the
            for-loop reference).

    The learned LR starts at each group's ``initial_lr`` (set if missing to its ``lr``). Per step
    and group: h_t = <g_hat_t, snapshot - w_t> / eta_{t-1}, with g_hat the gradient of the
    objective (unscaled by AMP's scale when the optimizer takes it, negated for ``maximize``, plus
    the L2 term), the rule, and ``group["lr"] = s_t * eta_t`` for the step, where s_t =
    ``group["lr"] / group["initial_lr"]`` is the schedule's scale. Memory: one snapshot of the
    weights. A float ``group["lr"]`` is written as a float, which reads the learned LR on the host
    (a synchronisation on GPUs; a tensor ``lr``, as fused/capturable optimizers take, is written
    in place without one).

    With ``torch.amp.GradScaler`` a skipped step changes nothing: for most optimizers the scaler
    does not call ``step()`` (no hook runs); optimizers that take the scale themselves (torch's
    ``fused=True``) hand the hooks ``grad_scale`` and ``found_inf``, and the learned LR and the
    snapshot are then kept on the device.

    The update is measured, not computed: where it is small next to the weights it loses
    precision (float32 weights: about 6e-8 |w| / |w_{t-1} - w_t| relative); bfloat16 or float16
    weights lose most of it and are refused unless ``allow_low_precision=True``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        hyper_lr: float | None = None,
        *,
        multiplicative: bool = False,
        per_tensor: bool = False,
        lr_lag: int = 0,
        decoupled_weight_decay: bool | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        allow_low_precision: bool = False,
        hyper_optimizer: str = "sgd",
        hyper_betas: tuple[float, float] | None = None,
        hyper_eps: float | None = None,
        lr_bounds: tuple[float, float] | None = None,
        lr_warmup: int | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"HyperLR wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, LRLearner):
            raise ValueError(
                f"{type(optimizer).__name__} learns its LR itself; HyperLR is for optimizers "
                "that do not (torch.optim's and others)"
            )
        if getattr(optimizer, _ATTRIBUTE, None) is not None:
            raise ValueError("this optimizer already has a HyperLR; call .remove() on it first")
        if hyper_lr is None and hyper_optimizer == "sgd":
            raise ValueError(
                "HyperLR needs hyper_lr with hyper_optimizer='sgd' (its scale is the wrapped "
                "optimizer's: about 1e-3 for SGD, 1e-7 for Adam), or hyper_optimizer='adam', "
                "whose hyper-arguments have defaults"
            )
        self.multiplicative = check_bool("multiplicative", multiplicative)
        self.hyper = hyper_settings(
            hyper_optimizer=hyper_optimizer, hyper_lr=hyper_lr, hyper_betas=hyper_betas,
            hyper_eps=hyper_eps, lr_bounds=lr_bounds, lr_warmup=lr_warmup,
            sgd_hyper_lr=0.0,
            multiplicative=multiplicative,
        )  # fmt: skip
        self.hyper_lr = self.hyper["hyper_lr"]
        self.per_tensor = check_bool("per_tensor", per_tensor)
        self.lr_lag = check_choice("lr_lag", lr_lag, (0, 1))
        self.decoupled_weight_decay = check_optional_bool(
            "decoupled_weight_decay", decoupled_weight_decay
        )
        self.foreach = check_optional_bool("foreach", foreach)
        self.fused = check_optional_bool("fused", fused)
        self.allow_low_precision = check_bool("allow_low_precision", allow_low_precision)
        check_fused_request("hyper_lr", foreach, fused)
        for index, group in enumerate(optimizer.param_groups):
            self._check_group(optimizer, index, group)
        self.optimizer = optimizer
        self.groups: list[dict[str, Any]] = []
        self.snapshots: list[list[Tensor | None]] = []
        self._pending: list[dict[str, Any] | None] = []
        self._sync_groups()
        setattr(optimizer, _ATTRIBUTE, self)
        self._loaded: dict[str, Any] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_state_dict_post_hook(self._save_with_optimizer),
            optimizer.register_load_state_dict_pre_hook(self._take_from_optimizer_state),
            optimizer.register_load_state_dict_post_hook(self._load_with_optimizer),
        ]

    # ------------------------------------------------------------------ checks and state
    def _check_group(self, optimizer, index, group) -> None:
        initial = group.get("initial_lr", group["lr"])
        if isinstance(initial, Tensor):
            initial = float(initial)  # once, at construction
        if not initial > 0 or initial != initial:
            raise ValueError(
                f"HyperLR: param group {index} has initial LR {initial}; it must be > 0 (the "
                "update is measured from the weights, and a zero LR moves none)"
            )
        if self.hyper["hyper_optimizer"] == "adam":
            check_lr_in_bounds(initial, self.hyper["lr_bounds"])
        params = group["params"]
        if len({p.device for p in params}) > 1:
            raise ValueError(
                f"HyperLR: the params of group {index} are on several devices; its learned LR "
                "lives on one: put them in separate groups"
            )
        low = sorted({str(p.dtype) for p in params if p.dtype in (torch.bfloat16, torch.float16)})
        if low and not self.allow_low_precision:
            raise ValueError(
                f"HyperLR: group {index} has {', '.join(low)} parameters; the update measured "
                "from such weights is rounded to about 3 significant digits (smaller updates "
                "vanish), which makes the hypergradient meaningless. Keep float32 master weights "
                "(torch.autocast, or FSDP2's MixedPrecisionPolicy) or pass "
                "allow_low_precision=True"
            )
        if low:
            warnings.warn(
                f"HyperLR: group {index} has {', '.join(low)} parameters: the measured update, "
                "and with it the hypergradient, is coarse",
                stacklevel=3,
            )
        _objective_decay(optimizer, group, self.decoupled_weight_decay)
        if self.fused and params and not any(p.is_meta for p in params):
            check_fused_params("hyper_lr", params)

    def _sync_groups(self) -> None:
        """Hyper-state for groups added since (``add_param_group``)."""
        for group in self.optimizer.param_groups[len(self.groups) :]:
            if self.groups:
                self._check_group(self.optimizer, len(self.groups), group)
            group.setdefault("initial_lr", group["lr"])
            self.groups.append(self._new_group_state(group))
            self.snapshots.append([None] * len(group["params"]))
            self._pending.append(None)

    def _new_group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        device, dtype = hyper_device_dtype(group["params"])
        shape = (len(group["params"]),) if self.per_tensor else ()
        initial = group["initial_lr"]
        eta = float(initial) if not isinstance(initial, Tensor) else float(initial.detach())
        state: dict[str, Any] = {
            "learned_lr": torch.full(shape, eta, dtype=dtype, device=device),
            "prev_lr": torch.full(shape, eta, dtype=dtype, device=device),
            "hypergrad": torch.zeros(shape, dtype=dtype, device=device),
            "effective_lr": torch.full(shape, eta, dtype=dtype, device=device),
            "has_previous": [0] * len(group["params"]),
            "host_lr": None,  # lr_lag with a float LR: the next step's eta, read ahead
            "warmup_steps_done": 0,  # the lr_warmup count
        }
        if self.hyper["hyper_optimizer"] == "adam":
            state["hyper_adam_state"] = initial_adam_state(shape, dtype, device)
        return state

    def _group_tensors(self) -> tuple[str, ...]:
        """The keys of a group's hyper-state tensors."""
        adam = self.hyper["hyper_optimizer"] == "adam"
        return _GROUP_TENSORS + (("hyper_adam_state",) if adam else ())

    @property
    def learned_lr(self) -> list[Tensor]:
        """Per group, the learned LR eta (a device tensor; one entry per tensor with
        ``per_tensor``). Reading its value is the caller's synchronisation."""
        return [state["learned_lr"] for state in self.groups]

    @property
    def effective_lr(self) -> list[Tensor]:
        """Per group, the LR the last step applied (the schedule's scale times eta)."""
        return [state["effective_lr"] for state in self.groups]

    @property
    def hypergrad(self) -> list[Tensor]:
        """Per group, dE/d eta = -h of the last step."""
        return [state["hypergrad"] for state in self.groups]

    @staticmethod
    def attached(optimizer: Optimizer) -> HyperLR | None:
        """The HyperLR attached to ``optimizer``, if any."""
        return getattr(optimizer, _ATTRIBUTE, None)

    def remove(self) -> None:
        """Detach from the optimizer: the hooks go, ``group["lr"]`` keeps its scheduled value."""
        self._restore_pending()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(self.optimizer, _ATTRIBUTE, None) is self:
            delattr(self.optimizer, _ATTRIBUTE)

    # ------------------------------------------------------------------ the hooks
    def _implementation(self, params: list[Tensor]) -> str:
        return choose_implementation(
            params, foreach=self.foreach, fused=self.fused, algorithm="hyper_lr"
        )

    def _pre_step(self, optimizer: Optimizer, args: tuple, kwargs: dict):
        """Before the step; with a closure (Lightning's, which runs zero_grad, forward and
        backward), right after the closure's first call, when the gradients exist."""
        self._restore_pending()  # a step that raised left its LR in the group
        # torch passes the hooks the step's arguments with the optimizer first.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._prepare(optimizer)
            return None
        prepared = []

        def closure_then_prepare():
            loss = closure()
            if not prepared:  # optimizers that call the closure again (LBFGS): once per step
                prepared.append(True)
                self._prepare(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_prepare}
        return (args[0], closure_then_prepare, *args[2:]), kwargs

    def _prepare(self, optimizer: Optimizer) -> None:
        """h_t, the rule and the step's LR for every group."""
        self._sync_groups()
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        for index, group in enumerate(optimizer.param_groups):
            self._pre_group(index, group, grad_scale, found_inf)

    def _pre_group(self, index, group, grad_scale, found_inf) -> None:
        state, snapshots = self.groups[index], self.snapshots[index]
        params = group["params"]
        stepped = [i for i, p in enumerate(params) if p.grad is not None]
        was_previous = state["has_previous"]
        state["has_previous"] = [0] * len(params)
        if not stepped:
            return
        for i in stepped:
            if snapshots[i] is None:
                snapshots[i] = torch.empty_like(params[i].detach())
                was_previous[i] = 0
            state["has_previous"][i] = 1
        mesh = mesh_group(params)
        local = local_shards if mesh is not None else (lambda ts: ts)
        chosen = [params[i] for i in stepped]
        implementation = "single" if mesh is not None else self._implementation(chosen)
        per_tensor = self.per_tensor
        sums = pass_implementation(implementation)(
            local(chosen), local([params[i].grad for i in stepped]),
            local([snapshots[i] for i in stepped]), [was_previous[i] for i in stepped],
            len(stepped) if per_tensor else 1,
            weight_decay=_objective_decay(self.optimizer, group, self.decoupled_weight_decay),
            maximize=bool(group.get("maximize", False)), grad_scale=grad_scale,
            found_inf=found_inf,
        )  # fmt: skip
        if mesh is not None:
            [sums] = sum_reducer(params, None)([sums])
        sums = sums.to(state["learned_lr"].dtype)
        if per_tensor and len(stepped) != len(params):
            full = sums.new_zeros(3, len(params))
            full[:, stepped] = sums
            sums = full
        lrs = state["learned_lr"]
        before = lrs.clone() if self.lr_lag else None
        hyper_lr_rule_(
            lrs, state["hypergrad"], sums, state["prev_lr"], hyper_lr=self.hyper_lr,
            multiplicative=self.multiplicative, found_inf=found_inf,
            log_lr_adam=log_lr_adam(self.hyper, [state.get("hyper_adam_state")]),
        )  # fmt: skip
        applied = before if before is not None else lrs
        self._set_step_lr(index, group, applied, stepped, found_inf)

    def _set_step_lr(self, index, group, applied, stepped, found_inf) -> None:
        """``group["lr"]`` = s_t * eta for the step (the largest eta with ``per_tensor``), and
        what the post-hook needs to put it back and to finish the step."""
        state = self.groups[index]
        scheduled = group["lr"]
        scale = _scale(scheduled, group["initial_lr"])
        warmup = warmup_factor(self.hyper["lr_warmup"], state["warmup_steps_done"])
        scale = scale if warmup == 1.0 else scale * warmup
        reference = applied.max() if self.per_tensor else applied
        pending: dict[str, Any] = {"applied": applied, "found_inf": found_inf}
        if isinstance(scheduled, Tensor):
            pending["scheduled"] = scheduled.detach().clone()
            scheduled.detach().copy_(reference * scale)
        else:
            pending["scheduled"] = scheduled
            ahead = state["host_lr"] if self.lr_lag else None
            # The host read of a float LR: with lr_lag its copy was started a step ago.
            group["lr"] = scale * (float(reference) if ahead is None else _host_value(ahead))
        state["effective_lr"] = applied * scale
        if self.per_tensor:
            ratio = applied / torch.where(reference > 0, reference, 1.0)
            pending["ratio"] = ratio
            pending["stepped"] = stepped
        self._pending[index] = pending

    def _post_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        for index, group in enumerate(optimizer.param_groups):
            pending = self._pending[index]
            if pending is None:
                continue
            self._pending[index] = None
            state = self.groups[index]
            self._restore_lr(group, pending)
            count_warmup_step(state, self.hyper["lr_warmup"])
            applied, found_inf = pending["applied"], pending["found_inf"]
            if found_inf is None:
                state["prev_lr"] = applied.clone()
            else:
                skip = found_inf.reshape(()) != 0
                state["prev_lr"] = torch.where(skip, state["prev_lr"], applied)
            if self.per_tensor:
                self._rescale(index, group, pending)
            if self.lr_lag and not isinstance(group["lr"], Tensor):
                reference = state["learned_lr"].max() if self.per_tensor else state["learned_lr"]
                state["host_lr"] = _read_ahead(reference)

    def _rescale(self, index, group, pending) -> None:
        """per_tensor: w_i <- w_t + (eta_i / eta_max) (w_{t+1} - w_t) for every tensor stepped,
        as ``lerp`` towards the snapshot (exact where the ratio is 1)."""
        ratio, found_inf = pending["ratio"], pending["found_inf"]
        weight = 1.0 - ratio
        if found_inf is not None:
            weight = torch.where(found_inf.reshape(()) != 0, 0.0, weight)
        params, snapshots = group["params"], self.snapshots[index]
        local = local_shards if mesh_group(params) is not None else (lambda ts: ts)
        stepped = pending["stepped"]
        weights = local([params[i] for i in stepped])
        with torch.no_grad():
            if len({w.dtype for w in weights}) == 1:  # one list op
                factors = list(weight[stepped].to(weights[0].dtype).unbind())
                torch._foreach_lerp_(weights, local([snapshots[i] for i in stepped]), factors)
                return
            for i, w in zip(stepped, weights):
                w.lerp_(local([snapshots[i]])[0], weight[i].to(w.dtype))

    @staticmethod
    def _restore_lr(group: dict[str, Any], pending: dict[str, Any]) -> None:
        scheduled = pending["scheduled"]
        if isinstance(scheduled, Tensor):
            group["lr"].detach().copy_(scheduled)
        else:
            group["lr"] = scheduled

    def _restore_pending(self) -> None:
        for index, pending in enumerate(self._pending):
            if pending is not None:
                self._restore_lr(self.optimizer.param_groups[index], pending)
                self._pending[index] = None

    # ------------------------------------------------------------------ checkpoints
    # The optimizer's own state_dict carries the wrapper's under STATE_KEY, so checkpoints that
    # save and load only the optimizer (transformers' Trainer, Lightning) resume the learned LR.
    def _save_with_optimizer(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        state_dict[STATE_KEY] = self.state_dict()

    def _take_from_optimizer_state(self, optimizer: Optimizer, state_dict: dict[str, Any]):
        self._loaded = state_dict.get(STATE_KEY)
        if self._loaded is None:
            return None
        return {key: value for key, value in state_dict.items() if key != STATE_KEY}

    def _load_with_optimizer(self, optimizer: Optimizer) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            self.load_state_dict(loaded)

    def state_dict(self) -> dict[str, Any]:
        """The learned LRs, hypergradients, previous LRs and snapshots (tensors, numbers and
        lists: loadable with ``torch.load(weights_only=True)``)."""
        return {
            "settings": self._settings(),
            "groups": [self._group_state_dict(state) for state in self.groups],
            "snapshots": [[None if t is None else t.detach().clone() for t in ts]
                          for ts in self.snapshots],
        }  # fmt: skip

    def _group_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        out = {key: state[key].clone() for key in self._group_tensors()}
        out["has_previous"] = list(state["has_previous"])
        ahead = state["host_lr"]
        out["host_lr"] = None if ahead is None else _host_value(ahead)
        out["warmup_steps_done"] = state["warmup_steps_done"]
        return out

    def _settings(self) -> dict[str, Any]:
        settings = {"hyper_lr": self.hyper_lr, "multiplicative": self.multiplicative,
                    "per_tensor": self.per_tensor, "lr_lag": self.lr_lag}  # fmt: skip
        if self.hyper["hyper_optimizer"] == "adam" or self.hyper["lr_warmup"]:
            settings.update(self.hyper)  # absent otherwise: older state_dicts load
        return settings

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` of a HyperLR with the same settings on an optimizer with
        the same groups; tensors go to the params' devices (snapshots laid out as the params,
        DTensor shards included)."""
        self._sync_groups()
        settings = state_dict.get("settings", {})
        if settings != self._settings():
            raise ValueError(
                f"HyperLR.load_state_dict: the state_dict was saved with {settings}, this "
                f"HyperLR has {self._settings()}"
            )
        groups, snapshots = state_dict["groups"], state_dict["snapshots"]
        sizes = [len(g["params"]) for g in self.optimizer.param_groups]
        if len(groups) != len(sizes) or [len(s) for s in snapshots] != sizes:
            raise ValueError(
                f"HyperLR.load_state_dict: the state_dict has {[len(s) for s in snapshots]} "
                f"params per group, the optimizer {sizes}"
            )
        self._restore_pending()
        for index, (group, saved) in enumerate(zip(self.optimizer.param_groups, groups)):
            fresh = self._new_group_state(group)
            for key in self._group_tensors():
                value = saved[key]
                if tuple(value.shape) != tuple(fresh[key].shape):
                    raise ValueError(
                        f"HyperLR.load_state_dict: {key} of group {index} has shape "
                        f"{tuple(value.shape)}, expected {tuple(fresh[key].shape)}"
                    )
                fresh[key] = value.to(device=fresh[key].device, dtype=fresh[key].dtype, copy=True)
            fresh["has_previous"] = [int(h) for h in saved["has_previous"]]
            fresh["host_lr"] = saved.get("host_lr")
            fresh["warmup_steps_done"] = int(saved.get("warmup_steps_done", 0))
            self.groups[index] = fresh
            self.snapshots[index] = [
                None if t is None else distribute_like(t, p)
                for t, p in zip(snapshots[index], group["params"])
            ]
