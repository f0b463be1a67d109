"""Helpers shared by the fused paths (``_sgd_hd_fused``, ``_adam_hd_fused``): the LR slots as the
1-D tensors the compiled ops take."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["copy_back_slots", "slot_tensors"]


def _slot_tensor(slots: list[Tensor]) -> tuple[Tensor, bool]:
    """One 1-D tensor holding every slot, and whether it must be copied back into ``slots``.

    One slot: a view of it. One per tensor: the group's 1-D tensor when ``slots`` are its
    elements in order (the usual case: every parameter has a gradient), else a stacked copy.
    """
    if len(slots) == 1:
        return slots[0].view(1), False
    base = slots[0]._base
    if (
        base is not None
        and base.dim() == 1
        and base.is_contiguous()
        and base.numel() == len(slots)
        and all(
            s._base is base and s.storage_offset() == base.storage_offset() + i
            for i, s in enumerate(slots)
        )
    ):
        return base, False
    return torch.stack(slots), True


def slot_tensors(*slot_lists: list[Tensor]) -> list[tuple[Tensor, bool]]:
    """For each list of 0-dim slot tensors: (its 1-D tensor, whether it is a copy)."""
    return [_slot_tensor(slots) for slots in slot_lists]


def copy_back_slots(slot_lists: tuple[list[Tensor], ...], tensors: list[tuple[Tensor, bool]]):
    """Writes stacked copies back into their 0-dim slots (views need nothing)."""
    for slots, (stacked, copy) in zip(slot_lists, tensors):
        if copy:
            torch._foreach_copy_(slots, list(stacked.unbind(0)))
