"""A transformers ``TrainerCallback`` that adds each group's learned LR (and hypergradient, mu)
to the Trainer's logs: the Trainer itself logs ``get_last_lr()``, the scheduled ``group["lr"]``,
not the LR our optimizers learned. Needs ``transformers`` (an optional extra)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from hyperlr_ext.integrations import _unwrap, learned_values

__all__ = ["HyperLRCallback"]


class HyperLRCallback(TrainerCallback):
    """``Trainer(..., callbacks=[HyperLRCallback()])``: every log entry gains
    ``effective_lr/group<i>``, ``hypergrad/group<i>`` (and ``mu``/``hyper_lr`` for MARTHE)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               optimizer: Any = None, **kwargs: Any) -> None:  # fmt: skip
        if logs is None or optimizer is None:
            return
        values = learned_values(_unwrap(optimizer))
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
