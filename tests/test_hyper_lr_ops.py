"""The fused HyperLR pass (csrc/hyper_lr*.{h,cpp}, csrc/cuda/hyper_lr.cu) and
``fused_hyper_lr_sums_``.

The op against the for-loop reference ``hyper_lr_sums_`` on random data with every flag mixed
(tensors without a previous update, a zero-size, a 0-dim and a two-chunk tensor, group and
per-tensor LR slots, AMP's grad_scale and found_inf, maximize, weight decay): sums close, snapshots
bit for bit. opcheck on samples of each mode, the error messages, the empty list, non-contiguous
inputs and thread-count independence. The CUDA kernel is compared with the CPU one bit for bit by
test_cuda_emu.py (emulated) and cuda_kernel_driver.py (on a GPU), on the samples of _op_samples.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.library import opcheck

from hyperlr_ext import _ops
from hyperlr_ext.functional._foreach_hd import list_ops_on
from hyperlr_ext.functional.hyper_lr import (
    foreach_hyper_lr_sums_,
    fused_hyper_lr_sums_,
    hyper_lr_sums_,
)

pytestmark = pytest.mark.skipif(
    not _ops.EXTENSION_AVAILABLE, reason=f"compiled extension unavailable: {_ops.EXTENSION_ERROR}"
)

SHAPES = [(3, 4), (7,), (0, 2), (2, 3, 5), (), (70000,)]  # a zero-size, a 0-dim, a 2-chunk tensor
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "float64", "bfloat16", "float16"]
# Relative tolerance of the sums (the same terms summed in another order).
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
SETTINGS = [
    dict(weight_decay=0.0, maximize=False, amp=None),
    dict(weight_decay=0.01, maximize=True, amp=None),
    dict(weight_decay=0.1, maximize=False, amp=0.0),
    dict(weight_decay=0.0, maximize=True, amp=1.0),
]
SETTING_IDS = ["plain", "decay-maximize", "amp", "amp-skip"]


def _state(device, dtype, *, seed=0, shapes=SHAPES):
    """Random params, grads and snapshots; every third tensor (1, 4, ...) has no previous update."""
    gen = torch.Generator().manual_seed(seed)

    def lists(scale=1.0):
        return [
            (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
            for s in shapes
        ]

    params, grads, snapshots = lists(), lists(64.0), lists()
    has_previous = [int(i % 3 != 1) for i in range(len(shapes))]
    return params, grads, snapshots, has_previous


def _amp(device, found_inf):
    """grad_scale 64 (the grads are scaled by it) and found_inf, or neither."""
    if found_inf is None:
        return None, None
    return torch.full((1,), 64.0, device=device), torch.full((), found_inf, device=device)


def _call(func, state, num_slots, setting):
    params, grads, snapshots, has_previous = state
    grad_scale, found_inf = _amp(params[0].device, setting["amp"])
    return func(
        params, grads, snapshots, has_previous, num_slots,
        weight_decay=setting["weight_decay"], maximize=setting["maximize"],
        grad_scale=grad_scale, found_inf=found_inf,
    )  # fmt: skip


def _assert_sums_close(got, want, rtol):
    """Rows dot, |g^|^2, |d|^2: the squares relative to themselves, the dot relative to
    |g^| |d| (Cauchy-Schwarz bounds the sum of the magnitudes of its terms)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = (want[1] * want[2]).sqrt()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=rtol * scale.max().item() + 1e-30)
    torch.testing.assert_close(got[1:], want[1:], rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("per_tensor", [False, True], ids=["group", "per-tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_matches_reference(dtype, per_tensor, setting):
    state = _state("cpu", dtype)
    num_slots = len(SHAPES) if per_tensor else 1
    original = copy.deepcopy(state[2])
    ref_state = copy.deepcopy(state)
    list_state = copy.deepcopy(state)
    got = _call(fused_hyper_lr_sums_, state, num_slots, setting)
    want = _call(hyper_lr_sums_, ref_state, num_slots, setting)
    _assert_sums_close(got, want, RTOL[dtype])
    with list_ops_on("cpu"):  # the foreach pass's GPU branch, on CPU tensors
        _assert_sums_close(_call(foreach_hyper_lr_sums_, list_state, num_slots, setting), want,
                           RTOL[dtype])  # fmt: skip
    if per_tensor:
        assert got[:, 2].eq(0).all()  # the zero-size tensor adds nothing
        # Tensors without a previous update add only to |g^|^2.
        assert got[0, 1] == 0 and got[2, 1] == 0 and got[1, 1] > 0
    flags = state[3]
    for a, b, c, old, p, flag in zip(state[2], ref_state[2], list_state[2], original, state[0],
                                     flags):  # fmt: skip
        assert torch.equal(a, b) and torch.equal(a, c)
        # A skipped step keeps the snapshots that count; the others take w (it did not move).
        assert torch.equal(a, old if setting["amp"] == 1.0 and flag else p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_non_contiguous_inputs(dtype):
    state = _state("cpu", dtype, seed=1)
    for lst in state[:3]:
        lst[0] = lst[0].t().contiguous().t()  # (3, 4) as a transposed view
    state[2][3] = torch.randn(2, 3, 10, dtype=dtype)[..., ::2]  # a strided snapshot
    ref_state = copy.deepcopy(state)
    setting = SETTINGS[1]
    got = _call(fused_hyper_lr_sums_, state, len(SHAPES), setting)
    want = _call(hyper_lr_sums_, ref_state, len(SHAPES), setting)
    _assert_sums_close(got, want, RTOL[dtype])
    for a, p in zip(state[2], state[0]):
        assert torch.equal(a, p)
    assert not state[2][3].is_contiguous()


def test_thread_count_does_not_change_results():
    results = []
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            state = _state("cpu", torch.float32, shapes=[(5,), (300000,), (70000,)])
            results.append(_call(fused_hyper_lr_sums_, state, 1, SETTINGS[2]))
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])


def test_empty_lists():
    for num_slots in (0, 1):
        got = torch.ops.hyperlr_ext.hyper_lr_sums_([], [], [], [], num_slots, 0.0, False)
        assert torch.equal(got, torch.zeros(3, 1)) and got.dtype == torch.float32
    want = hyper_lr_sums_([], [], [], [], 1, weight_decay=0.0, maximize=False)
    assert torch.equal(fused_hyper_lr_sums_([], [], [], [], 1, weight_decay=0.0, maximize=False),
                       want)  # fmt: skip


def test_errors_name_the_argument():
    params, grads, snapshots, has_previous = _state("cpu", torch.float32)
    op = torch.ops.hyperlr_ext.hyper_lr_sums_
    n = len(SHAPES)
    with pytest.raises(RuntimeError, match=rf"num_slots must be 1 or len\(params\) = {n}, got 2"):
        op(params, grads, snapshots, has_previous, 2, 0.0, False)
    with pytest.raises(RuntimeError, match=r"grads must have one tensor per param \(6\), got 5"):
        op(params, grads[:5], snapshots, has_previous, 1, 0.0, False)
    with pytest.raises(RuntimeError, match=r"snapshots must have one tensor per param"):
        op(params, grads, snapshots[:5], has_previous, 1, 0.0, False)
    with pytest.raises(RuntimeError, match=r"snapshots\[2\] has 3 elements"):
        bad = snapshots[:2] + [torch.zeros(3)] + snapshots[3:]
        op(params, grads, bad, has_previous, 1, 0.0, False)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype Double"):
        bad = grads[:1] + [grads[1].double()] + grads[2:]
        op(params, bad, snapshots, has_previous, 1, 0.0, False)
    with pytest.raises(RuntimeError, match="has_previous needs one flag per param"):
        op(params, grads, snapshots, has_previous[:2], 1, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_scale must be a float32 tensor"):
        op(params, grads, snapshots, has_previous, 1, 0.0, False, torch.ones(1).double())
    with pytest.raises(RuntimeError, match="found_inf must be a float32 tensor with one element"):
        op(params, grads, snapshots, has_previous, 1, 0.0, False, None, torch.zeros(2))
    with pytest.raises(RuntimeError, match="support float32, float64, bfloat16 and float16"):
        ints = [torch.zeros(s, dtype=torch.int32) for s in SHAPES]
        op(ints, ints, ints, has_previous, 1, 0.0, False)
    with pytest.raises(ValueError, match=r"num_slots must be 1 or len\(params\)"):
        hyper_lr_sums_(params, grads, snapshots, has_previous, 2, weight_decay=0.0, maximize=False)


def _op_samples(device, dtype, shapes=SHAPES):
    """(op, args) for opcheck and the CUDA comparisons: per-tensor and group slots, with and
    without AMP (found_inf 0 and 1), maximize and weight decay. The first sample has per-tensor
    slots (test_cuda_emu.py keeps only the first at its largest layout)."""
    n = len(shapes)
    for seed, (num_slots, setting) in enumerate([
        (n, SETTINGS[2]), (1, SETTINGS[0]), (n, SETTINGS[1]), (1, SETTINGS[3]), (1, SETTINGS[2]),
    ]):  # fmt: skip
        params, grads, snapshots, has_previous = _state(device, dtype, seed=seed, shapes=shapes)
        grad_scale, found_inf = _amp(device, setting["amp"])
        args = (params, grads, snapshots, has_previous, num_slots, setting["weight_decay"],
                setting["maximize"])  # fmt: skip
        if grad_scale is not None:
            args = (*args, grad_scale, found_inf)
        yield torch.ops.hyperlr_ext.hyper_lr_sums_.default, args


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck_cpu(dtype):
    small = [s for s in SHAPES if torch.Size(s).numel() < 1000]
    for op, args in _op_samples("cpu", dtype, shapes=small):
        opcheck(op, args)
