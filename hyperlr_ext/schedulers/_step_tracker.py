"""Which optimizer steps ran: the schedulers' view of a step that torch.amp.GradScaler skipped.

GradScaler skips a step with inf/NaN gradients by not calling ``optimizer.step()`` (for every
optimizer that does not take its scale itself). A scheduler stepped after it would otherwise
count a step that never happened: TLR would close its window early, MLR-SNet would advance its
LSTM on a loss whose step was thrown away. ``StepTracker`` counts the calls with the optimizer's
own step post-hook (no wrapper, no host sync) and tells the scheduler whether one ran since it
last asked.
"""

from __future__ import annotations

import weakref

from torch.optim import Optimizer

__all__ = ["StepTracker"]


class StepTracker:
    """Counts ``optimizer.step()`` calls; :meth:`ran` says whether any happened since the last
    :meth:`ran` (or since the tracker was made)."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.calls = 0
        ref = weakref.ref(self)

        def count(opt: Optimizer, args: tuple, kwargs: dict) -> None:
            tracker = ref()
            if tracker is not None:
                tracker.calls += 1

        self.handle = optimizer.register_step_post_hook(count)
        weakref.finalize(self, self.handle.remove)  # the hook goes with the scheduler
        self._optimizer = weakref.ref(optimizer)

    def __deepcopy__(self, memo: dict) -> StepTracker:
        """A tracker on the copy of the optimizer when the same deepcopy made one (a copied
        scheduler copies its optimizer), else on the optimizer itself."""
        optimizer = self._optimizer()
        if optimizer is None:
            raise RuntimeError("StepTracker: its optimizer no longer exists")
        copy = StepTracker(memo.get(id(optimizer), optimizer))
        copy.calls = self.calls
        return copy

    def ran(self) -> bool:
        """True when the optimizer stepped since the last call; resets the count."""
        ran, self.calls = self.calls > 0, 0
        return ran
