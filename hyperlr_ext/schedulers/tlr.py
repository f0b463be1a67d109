"""TLR: the Newton-based trainable LR (Retsinas et al.) as a torch LR scheduler.

Equations: docs/design.md, TLR, and hyperlr_ext/functional/tlr.py. Works on top of any
torch.optim optimizer (and of ours): the window's update direction is measured from the weights,
so momentum and Adam directions are handled as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from hyperlr_ext._common.checks import check_number, check_optional_bool
from hyperlr_ext._common.devices import hyper_device_dtype
from hyperlr_ext._common.sharded import distribute_like, local_shards, mesh_group
from hyperlr_ext._dispatch import check_fused_params, check_fused_request, choose_implementation
from hyperlr_ext.functional.tlr import fused_tlr_window_, tlr_rule_, tlr_window_
from hyperlr_ext.schedulers._step_tracker import StepTracker

__all__ = ["TLR"]


class TLR(LRScheduler):
    """Trainable LR by a damped Newton step on the LR every ``K`` optimizer steps.

    Args:
        optimizer: any torch.optim optimizer (SGD, momentum, Adam, ... or ours).
        gamma: the Newton damping, in (0, 1] (paper default 0.33).
        update_every: K, the window length in optimizer steps; or, when None,
            K = ceil(p * steps_per_epoch).
        p: the fraction of an epoch per window (paper default 0.20).
        steps_per_epoch: optimizer steps per epoch (needed when ``update_every`` is None).
        max_factor: the largest factor one update may multiply the LR by (default 100).
        fused: the compiled one-pass window end (None: where it is the default; True: required;
            False: the pure-PyTorch reference).

    Call ``sched.step()`` after every ``optimizer.step()``. At the end of every window, per param
    group: u_k = (w_snapshot - w) / eta, num = <u_{k-1}, u_k>, den = |u_{k-1}|^2 - num, and when
    den > 0, eta <- eta * min(1 + gamma num / den, max_factor); the first change comes at the end
    of the second window. The new LR is written to ``group["lr"]``: in place when it is a tensor
    (no host sync at all), else as a float, which reads one number from the device per group
    once per window. Memory: a snapshot of the weights and the previous window's u.

    A window counts the optimizer steps that ran: a step ``torch.amp.GradScaler`` skipped (it
    does not call ``optimizer.step()``) changes nothing here either. (An optimizer that takes the
    scaler's ``found_inf`` itself, such as ours with ``fused=True``, skips on the device; that
    step counts as one of the window that did not move the weights.)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        gamma: float = 0.33,
        update_every: int | None = None,
        p: float = 0.2,
        steps_per_epoch: int | None = None,
        max_factor: float = 100.0,
        *,
        fused: bool | None = None,
        last_epoch: int = -1,
    ) -> None:
        check_number("gamma", gamma, low=0.0, high=1.0, high_inclusive=True)
        if gamma == 0:
            raise ValueError("Invalid gamma value: 0; gamma must be a finite number in (0, 1]")
        check_number("max_factor", max_factor, low=1.0)
        check_number("p", p, high=1.0, high_inclusive=True)
        check_optional_bool("fused", fused)
        for name, value in (("update_every", update_every), ("steps_per_epoch", steps_per_epoch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):  # fmt: skip
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if update_every is None:
            if steps_per_epoch is None:
                raise ValueError(
                    "TLR needs update_every (the window length K in optimizer steps) or "
                    "steps_per_epoch (then K = ceil(p * steps_per_epoch))"
                )
            if p == 0:
                raise ValueError("Invalid p value: 0; p must be in (0, 1]")
            update_every = max(1, math.ceil(p * steps_per_epoch))
        check_fused_request("tlr", None, fused)
        if fused:
            for group in optimizer.param_groups:
                check_fused_params("tlr", group["params"])
        self.gamma, self.max_factor, self.fused = float(gamma), float(max_factor), fused
        self.update_every = int(update_every)
        self.window_step = 0  # optimizer steps in the current window
        self.windows = 0  # completed windows
        self.snapshots: list[list[Tensor]] = []
        self.prev_updates: list[list[Tensor]] = []
        super().__init__(optimizer, last_epoch)
        self._tracker = StepTracker(optimizer)  # after the initial step, which it must not see

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's scheduler state (the windows, snapshots and previous updates), without the
        step tracker (a hook handle)."""
        state = super().state_dict()
        state.pop("_tracker", None)
        return state

    def _ensure_buffers(self) -> None:
        """A snapshot (the current weights) and a zero u_prev per tensor, made once."""
        groups = self.optimizer.param_groups
        if len(self.snapshots) == len(groups):
            return
        self.snapshots = [[p.detach().clone() for p in g["params"]] for g in groups]
        self.prev_updates = [[torch.zeros_like(p) for p in g["params"]] for g in groups]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads the windows and copies the saved snapshots and updates into tensors laid out as
        the params: their devices and dtypes, and under FSDP2 their sharding (a checkpoint may
        come from another device, another number of ranks, or an unsharded run)."""
        state = dict(state_dict)
        saved = {k: state.pop(k) for k in ("snapshots", "prev_updates")}
        groups = self.optimizer.param_groups
        for key, lists in saved.items():
            if len(lists) != len(groups) or any(
                len(tensors) != len(g["params"]) for tensors, g in zip(lists, groups)
            ):
                raise ValueError(
                    f"TLR state_dict: {key} holds {[len(t) for t in lists]} tensors per group, "
                    f"the optimizer has {[len(g['params']) for g in groups]}"
                )
        super().load_state_dict(state)
        for key, lists in saved.items():
            setattr(self, key, [
                [distribute_like(t, p) for t, p in zip(ts, g["params"])]
                for ts, g in zip(lists, groups)
            ])  # fmt: skip

    # ------------------------------------------------------------------ the schedule
    def get_lr(self) -> list[float | Tensor]:
        """The LRs the groups hold (TLR changes them at window ends, in :meth:`step`)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        """Count one optimizer step; at the end of a window, update every group's LR."""
        if epoch is not None:
            raise ValueError("TLR.step() takes no epoch: call it once after every optimizer step")
        tracker = getattr(self, "_tracker", None)
        if tracker is not None and not tracker.ran():
            return  # the optimizer did not step (GradScaler skipped it): nothing to count
        self._step_count += 1
        self._ensure_buffers()
        if self.last_epoch < 0:  # the call from LRScheduler.__init__: nothing has moved yet
            self.last_epoch = 0
        else:
            self.last_epoch += 1
            self.window_step += 1
            if self.window_step >= self.update_every:
                self._end_window()
                self.window_step = 0
        self._last_lr = self.get_lr()

    def _end_window(self) -> None:
        has_previous = self.windows > 0
        for i, group in enumerate(self.optimizer.param_groups):
            params = group["params"]
            if not params:
                continue
            device, dtype = hyper_device_dtype(params)
            group_lr = group["lr"]
            if isinstance(group_lr, Tensor):
                lr = group_lr.detach().to(device=device, dtype=dtype, copy=True)
            else:
                lr = torch.full((), float(group_lr), dtype=dtype, device=device)
            mesh = mesh_group(params)
            if mesh is not None:
                # DTensor shards (FSDP2): u and the sums on the local shards, then the partial
                # sums of every rank added by one all-reduce over the mesh.
                sums = tlr_window_(local_shards(params), local_shards(self.snapshots[i]),
                                   local_shards(self.prev_updates[i]), lr,
                                   has_previous=has_previous)  # fmt: skip
                torch.distributed.all_reduce(sums, group=mesh)
            else:
                implementation = choose_implementation(
                    params, foreach=None, fused=self.fused, algorithm="tlr"
                )
                window = fused_tlr_window_ if implementation == "fused" else tlr_window_
                sums = window(params, self.snapshots[i], self.prev_updates[i], lr,
                              has_previous=has_previous)  # fmt: skip
            if not has_previous:
                continue
            tlr_rule_(lr, sums, gamma=self.gamma, max_factor=self.max_factor)
            if isinstance(group_lr, Tensor):
                group_lr.copy_(lr)
            else:
                group["lr"] = float(lr)  # the one host read, once per window
        self.windows += 1
