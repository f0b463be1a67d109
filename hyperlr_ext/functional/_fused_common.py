"""Helpers shared by the fused paths (``_sgd_hd_fused``, ``_adam_hd_fused``): the LR slots as the
1-D tensors the compiled ops take."""

from __future__ import annotations

import torch
from torch import Tensor

from hyperlr_ext.functional._hd_rule import LogLrAdam

__all__ = ["HdSlots", "copy_back_slots", "slot_tensors"]


def _slot_tensor(slots: list[Tensor]) -> tuple[Tensor, bool]:
    """One tensor holding every slot along its first axis (1-D for 0-dim slots; the Adam state
    of log eta has 4 values per slot), and whether it must be copied back into ``slots``.

    One slot: a view of it. One per tensor: the group's tensor when ``slots`` are its entries in
    order (the usual case: every parameter has a gradient), else a stacked copy.
    """
    if len(slots) == 1:
        return slots[0].unsqueeze(0), False
    base = slots[0]._base
    size = slots[0].numel()
    if (
        base is not None
        and base.is_contiguous()
        and tuple(base.shape) == (len(slots), *slots[0].shape)
        and all(
            s._base is base and s.storage_offset() == base.storage_offset() + i * size
            for i, s in enumerate(slots)
        )
    ):
        return base, False
    return torch.stack(slots), True


def slot_tensors(*slot_lists: list[Tensor]) -> list[tuple[Tensor, bool]]:
    """For each list of slot tensors: (one tensor with every slot, whether it is a copy)."""
    return [_slot_tensor(slots) for slots in slot_lists]


def copy_back_slots(slot_lists: tuple[list[Tensor], ...], tensors: list[tuple[Tensor, bool]]):
    """Writes stacked copies back into their 0-dim slots (views need nothing)."""
    for slots, (stacked, copy) in zip(slot_lists, tensors):
        if copy:
            torch._foreach_copy_(slots, list(stacked.unbind(0)))


class HdSlots:
    """The LR slots of a fused HD op as its arguments take them: ``lrs``, ``hypergrads``,
    ``effective_lrs`` (1-D), and with the Adam hyper-optimizer on log eta ``hyper_state`` (4
    values per slot) and ``hyper_adam`` (its settings); ``copy_back()`` after the op."""

    def __init__(self, lrs: list[Tensor], hypergrads: list[Tensor], effective_lrs: list[Tensor],
                 log_lr_adam: LogLrAdam | None) -> None:  # fmt: skip
        self._lists = (lrs, hypergrads, effective_lrs)
        if log_lr_adam is not None:
            self._lists += (log_lr_adam.states,)
        self._slots = slot_tensors(*self._lists)
        self.lrs, self.hypergrads, self.effective_lrs = (t for t, _ in self._slots[:3])
        self.hyper_state = None if log_lr_adam is None else self._slots[3][0]
        self.hyper_adam = [] if log_lr_adam is None else log_lr_adam.settings()

    def copy_back(self) -> None:
        copy_back_slots(self._lists, self._slots)
