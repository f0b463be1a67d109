"""A Lightning ``Callback`` that logs each group's learned LR (and hypergradient, mu) after every
training batch: Lightning's ``LearningRateMonitor`` logs the scheduled ``group["lr"]``, not what
our optimizers learned. Needs ``lightning`` (an optional extra)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from hyperlr_ext.integrations import _unwrap, learned_values

__all__ = ["HyperLRMonitor"]


class HyperLRMonitor(Callback):
    """``Trainer(callbacks=[HyperLRMonitor()])``: logs ``effective_lr/group<i>``,
    ``hypergrad/group<i>`` (``mu``/``hyper_lr`` for MARTHE) per optimizer every
    ``log_every_n_steps``-th batch, through the module's logger."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        for index, optimizer in enumerate(trainer.optimizers):
            tag = f"{self.prefix}opt{index}/" if len(trainer.optimizers) > 1 else self.prefix
            for key, value in learned_values(_unwrap(optimizer)).items():
                pl_module.log(f"{tag}{key}", value, on_step=True, on_epoch=False)
