"""The base of the optimizers that learn their LR (``HDOptimizer``, ``MARTHE``/``RTHO``): their
per-group hyper-state (learned LR, hypergradient, ...) lives in the param group as device
tensors in the group's hyper dtype (hyperlr_ext/_common/devices.py), and ``load_state_dict``
refuses the state of another optimizer or configuration before it touches anything, then puts
the hyper-state back where the params are."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from hyperlr_ext.optim._state_check import check_state_dict

__all__ = ["LRLearner"]


class LRLearner(Optimizer):
    """Subclasses name what a state_dict must agree on and implement ``_ensure_group_state``."""

    # Group settings a loaded state_dict must share (identity) or that fix its shapes
    # (structural), and the per-parameter state keys it may hold (_state_check.py).
    _IDENTITY_KEYS: tuple[str, ...] = ()
    _STRUCTURAL_KEYS: tuple[str, ...] = ()
    _STATE_KEYS: tuple[str, ...] = ()
    # Public attributes besides torch.optim's, kept by pickling and deepcopy (torch.optim's
    # __getstate__ keeps only defaults, state and param_groups), None where a pickle lacks them.
    _PUBLIC_ATTRS: tuple[str, ...] = ("nonfinite_step",)

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        # The inf/NaN flag of the last step (a device tensor), None before the first.
        self.nonfinite_step: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name, None) for name in self._PUBLIC_ATTRS})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in self._PUBLIC_ATTRS:
            state.setdefault(name, None)
        super().__setstate__(state)

    @classmethod
    def _placed_state_keys(cls) -> tuple[str, ...]:
        """The per-parameter state made in its parameter's dtype and on its device (all but the
        step counts): the step compares the first one present with the parameter."""
        return tuple(key for key in cls._STATE_KEYS if key != "step")

    def _ensure_group_state(self, group: dict[str, Any]) -> None:  # pragma: no cover
        """Create the group's missing hyper-state and keep it on the params' device."""
        raise NotImplementedError

    def _after_load(self, state_dict: dict[str, Any]) -> None:
        """Per-parameter fix-ups after torch.optim's load (none by default)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load, after checking that the state_dict is one of this optimizer's
        with the same settings; then the group hyper-state goes back to the params' devices."""
        check_state_dict(
            type(self).__name__, state_dict, self.param_groups, identity=self._IDENTITY_KEYS,
            structural=self._STRUCTURAL_KEYS, state_keys=self._STATE_KEYS,
        )  # fmt: skip
        super().load_state_dict(state_dict)
        self._after_load(state_dict)
        for group in self.param_groups:
            self._ensure_group_state(group)
