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

    def ran(self) -> bool:
        """True when the optimizer stepped since the last call; resets the count."""
        ran, self.calls = self.calls > 0, 0
        return ran

    def remove(self) -> None:
        self.handle.remove()
