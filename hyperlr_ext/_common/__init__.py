"""Helpers shared by the optimizers (``hyperlr_ext.optim``) and the schedulers
(``hyperlr_ext.schedulers``): argument checks, where the hyper-state lives, DTensor (FSDP2)
layouts, and the derivatives of a closure's loss. Nothing here imports from those packages."""
