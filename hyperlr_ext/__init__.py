"""hyperlr_ext: PyTorch optimizers that learn the learning rate online from hypergradients.

>>> import hyperlr_ext as hx
>>> opt = hx.SGDHD(model.parameters(), lr=0.01, hyper_lr=1e-3)  # doctest: +SKIP
"""

from hyperlr_ext import _ops  # noqa: F401  (loads the compiled ops when present)
from hyperlr_ext._ops import multi_tensor_dot
from hyperlr_ext.optim import MARTHE, RTHO, SGDHD, AdamHD, HyperLR
from hyperlr_ext.schedulers import TLR, MLRSNet

__version__ = "0.1.0"

__all__ = [
    "SGDHD",
    "AdamHD",
    "HyperLR",
    "MARTHE",
    "RTHO",
    "TLR",
    "MLRSNet",
    "multi_tensor_dot",
    "__version__",
]
