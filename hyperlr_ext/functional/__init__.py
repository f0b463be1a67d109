"""Pure functions over tensor lists, one module per algorithm; each entry point dispatches to a
for-loop reference, a ``torch._foreach_*`` path or a fused kernel with one shared signature."""

from hyperlr_ext.functional.adam_hd import adam_hd
from hyperlr_ext.functional.sgd_hd import sgd_hd

__all__ = ["adam_hd", "sgd_hd"]
