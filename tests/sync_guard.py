"""A TorchDispatchMode that fails on a host-device sync (``aten._local_scalar_dense``: what
``.item()``, ``float(tensor)`` and ``bool(tensor)`` dispatch to), shared by the tests that check
that ``step()`` never reads a device value."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host-device sync inside step(): aten._local_scalar_dense")
        return func(*args, **(kwargs or {}))
