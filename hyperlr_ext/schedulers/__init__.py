"""LR schedulers that learn the LR of any torch.optim optimizer (and of ours)."""

from hyperlr_ext.schedulers.mlr_snet import MLRSNet, MLRSNetModule
from hyperlr_ext.schedulers.tlr import TLR

__all__ = ["MLRSNet", "MLRSNetModule", "TLR"]
