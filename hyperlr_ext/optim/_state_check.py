"""Refuse a state_dict saved by another optimizer or configuration before anything is changed.

torch.optim's ``load_state_dict`` checks only the number of groups and parameters; a state_dict
of SGDHD loaded into AdamHD, or of MARTHE with SGD inside into MARTHE with Adam, would load and
fail later (or silently misbehave). :func:`check_state_dict` raises a ``ValueError`` naming the
difference, and is called before the optimizer is touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["check_state_dict", "check_state_matches_params"]


def check_state_dict(
    name: str,
    state_dict: dict[str, Any],
    groups: list[dict[str, Any]],
    *,
    identity: Iterable[str],
    structural: Iterable[str],
    state_keys: Iterable[str],
) -> None:
    """``identity``: group keys every state_dict of this optimizer has (another optimizer's lacks
    some); ``structural``: group settings that fix the layout of the state and must match ours;
    ``state_keys``: the per-parameter state entries this optimizer may hold."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"{name}.load_state_dict: the state_dict has {len(saved_groups)} param groups, this "
            f"optimizer {len(groups)}"
        )
    identity, structural, allowed = list(identity), list(structural), set(state_keys)
    for index, (saved, group) in enumerate(zip(saved_groups, groups)):
        missing = [key for key in identity if key not in saved]
        if missing:
            raise ValueError(
                f"{name}.load_state_dict: param group {index} of the state_dict lacks {missing}: "
                f"it was not saved by {name} (another optimizer's state_dict?)"
            )
        for key in structural:
            if key in saved and saved[key] != group[key]:
                raise ValueError(
                    f"{name}.load_state_dict: param group {index} was saved with {key}="
                    f"{saved[key]!r} but this optimizer has {key}={group[key]!r}; the saved state "
                    "does not fit this configuration"
                )
    for param_id, param_state in state_dict["state"].items():
        unknown = sorted(set(param_state) - allowed)
        if unknown:
            raise ValueError(
                f"{name}.load_state_dict: the state of parameter {param_id} holds {unknown}, "
                f"which {name} never keeps: the state_dict comes from another optimizer"
            )


def _state_tensor(param_state: dict[str, Any], keys: tuple[str, ...] | None):
    """The state tensor to compare with its parameter: the first of ``keys`` present, or (keys
    None) the first tensor that is not a 0-dim count; (None, None) if there is none."""
    for key, value in (
        ((k, param_state.get(k)) for k in keys) if keys is not None else param_state.items()
    ):
        if value is not None and key != "step" and hasattr(value, "dtype") and value.dim() > 0:
            return key, value
    return None, None


def check_state_matches_params(
    name: str, params: Iterable[Any], state: dict[Any, Any], keys: tuple[str, ...] | None = None
) -> None:
    """A parameter whose dtype or device changed after its state was made (``model.double()``,
    ``model.to(...)`` after building the optimizer) gets a TypeError before anything moves.
    Looks at one state tensor per parameter (the state is created in the parameter's dtype and
    on its device): the first of ``keys`` it holds, or any that is not a 0-dim count. Runs for
    every parameter at every step, so the usual case is kept cheap: dtypes are singletons, and
    get_device()/is_cpu/is_cuda spare building device objects."""
    for index, p in enumerate(params):
        param_state = state.get(p)
        if not param_state:
            continue
        key, value = _state_tensor(param_state, keys)
        if value is None or (
            value.dtype is p.dtype
            and value.get_device() == p.get_device()
            and value.is_cpu == p.is_cpu
            and (value.is_cpu or value.is_cuda or value.device == p.device)
        ):
            continue
        raise TypeError(
            f"{name}: parameter {index} is now {p.dtype} on {p.device}, but its optimizer "
            f"state ({key!r}) is {value.dtype} on {value.device}: the parameter changed "
            "dtype or device after the optimizer was built. Build the optimizer after "
            "moving the model, or move the state with optimizer.load_state_dict("
            "optimizer.state_dict())"
        )
