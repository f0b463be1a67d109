"""Optimizer classes: argument checks, state and param groups over the functional algorithms."""

from hyperlr_ext.optim._hyper_optimizer import ROBUST_PRESET
from hyperlr_ext.optim.adam_hd import AdamHD
from hyperlr_ext.optim.hyper_lr import HyperLR
from hyperlr_ext.optim.marthe import MARTHE, RTHO
from hyperlr_ext.optim.sgd_hd import SGDHD

__all__ = ["SGDHD", "AdamHD", "HyperLR", "MARTHE", "RTHO", "ROBUST_PRESET"]
