"""Sample calls of every op that has a CUDA kernel, by family: each family's function yields
(op, args) pairs for a device and dtype, at the op tests' shapes or at given ones. Shared by the
emulated-kernel tests (test_cuda_emu.py) and the GPU kernel driver (cuda_kernel_driver.py)."""

from __future__ import annotations

import test_adam_hd_ops
import test_hyper_lr_ops
import test_sgd_hd_ops
import test_tangent_ops
import test_tlr
import torch


def dot_samples(device, dtype, shapes=test_sgd_hd_ops.SHAPES):
    gen = torch.Generator().manual_seed(0)

    def lists():
        return [
            torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes
        ]

    yield torch.ops.hyperlr_ext.multi_tensor_dot.default, (lists(), lists())


def tlr_samples(device, dtype, shapes=test_tlr.SHAPES):
    params, snapshots, prev_updates, lr = test_tlr._window_state(dtype, device, shapes=shapes)
    for has_previous in (True, False):
        args = ([p.contiguous() for p in params], snapshots, prev_updates, lr, has_previous)
        yield torch.ops.hyperlr_ext.tlr_window_.default, args


FAMILIES = {
    "multi_tensor_dot": dot_samples,
    "sgd_hd": test_sgd_hd_ops._op_samples,
    "adam_hd": test_adam_hd_ops._op_samples,
    "tangent": test_tangent_ops._op_samples,
    "tlr": tlr_samples,
    "hyper_lr": test_hyper_lr_ops._op_samples,
}
