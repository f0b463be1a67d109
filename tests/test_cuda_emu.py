"""The CUDA kernels of csrc/cuda, run on the CPU by the emulation build (docs/cuda_testing.md).

hyperlr_ext._C_emu holds csrc/cuda/*.cu compiled as C++ against tests/cuda_emu/cuda_emu.h and
registered as torch.ops.hyperlr_ext_emu.* for CPU tensors. Every op that has a CUDA kernel is called
on the same inputs through its CPU kernel (torch.ops.hyperlr_ext) and through its CUDA kernel; every
result and every tensor it writes must agree bit for bit: both run the math of csrc/*_math.h in the
same order (the emulation compiles the host branch of that math, so even pow is the same function).
The inputs are each op's opcheck samples (its test file's _op_samples) at three layouts:

- "default": the op tests' shapes (a zero-size, a 0-dim and a two-chunk tensor);
- "many": 80 tensors (72 not empty), more than one launch holds for every op, sizes around the
  chunk and lane boundaries, and per-tensor LR slots (one per tensor) in the per-tensor samples;
- "big": more chunks than one launch holds, with a tensor split between two launches (float32
  and float64 only: the launches count elements whatever their type);

in float32, float64, bfloat16 and float16, under two schedule seeds (the block order and the
interleaving of threads between barriers differ; at the big layout the dtypes alternate between
the two seeds). The emulation's own behaviour (warp collectives, atomics, poisoned shared memory,
the reports of divergent barriers) is tested at the end.
"""

from __future__ import annotations

import copy
import importlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from kernel_samples import FAMILIES

from hyperlr_ext import _ops

CHUNK = 65536  # csrc/hd_math.h kChunkSize
LANES = 512  # csrc/hd_math.h kLanes
MAX_BLOCKS_PER_LAUNCH = 320  # csrc/cuda/multi_tensor_apply.cuh


def _load_emulation():
    try:
        return importlib.import_module("hyperlr_ext._C_emu"), None
    except ImportError as exc:
        return None, f"hyperlr_ext._C_emu is not built ({exc}); `make test` builds it"


_C_emu, EMU_ERROR = _load_emulation()
if _C_emu is None and os.environ.get("HYPERLR_REQUIRE_EXTENSION") == "1":
    raise RuntimeError(f"HYPERLR_REQUIRE_EXTENSION=1 but {EMU_ERROR}")

pytestmark = [
    pytest.mark.cuda_emu,
    pytest.mark.skipif(_C_emu is None or not _ops.EXTENSION_AVAILABLE, reason=str(EMU_ERROR)),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "float64", "bfloat16", "float16"]
SEEDS = (0, 1)

_MANY_SIZES = [0, 1, 3, LANES - 1, LANES, LANES + 1, 4099, CHUNK - 1, CHUNK, CHUNK + 1]
LAYOUTS = {
    "default": None,
    "many": [(_MANY_SIZES[i % len(_MANY_SIZES)],) for i in range(80)],
    # 1 + 202 + 119 + 1 chunks: launch 0 is full (320 blocks) and ends inside tensor 3.
    "big": [(5,), (201 * CHUNK + 3,), (0,), (118 * CHUNK + 1,), (7,)],
}


def _per_tensor_slots(op, args):
    """True unless the op takes LR slots and this sample has a single (group) slot."""
    names = [argument.name for argument in op._schema.arguments]
    return "effective_lrs" not in names or args[names.index("effective_lrs")].numel() > 1


def _samples(family, dtype, layout):
    """The family's samples at `layout`. The many and big layouts are about the launcher, the
    LR slots and the reduction, not the per-element math that the default layout covers in every
    setting: there, samples with a single LR slot are left out, and at the big layout (21M-element
    lists) only the first sample is kept, to bound the time."""
    make = FAMILIES[family]
    shapes = LAYOUTS[layout]
    if shapes is None:
        yield from make("cpu", dtype)
        return
    for op, args in make("cpu", dtype, shapes=shapes):
        if _per_tensor_slots(op, args):
            yield op, args
            if layout == "big":
                return


def _seeds(dtype, layout):
    """Both seeds, but at the big layout one per dtype (the dtypes alternate between them)."""
    return SEEDS if layout != "big" else (SEEDS[DTYPES.index(dtype) % len(SEEDS)],)


def _emulated(op):
    name = op._schema.name.split("::", 1)[1]
    return getattr(torch.ops.hyperlr_ext_emu, name).default


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _assert_bitwise_equal(got, want, what):
    got, want = list(_tensors(got)), list(_tensors(want))
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        a_bits = a.reshape(-1).contiguous().view(torch.uint8)
        b_bits = b.reshape(-1).contiguous().view(torch.uint8)
        if not torch.equal(a_bits, b_bits):
            diff = (a.double() - b.double()).abs()
            pytest.fail(f"{what}: tensor {i} {tuple(a.shape)} differs in {int((diff != 0).sum())} "
                        f"elements (max |diff| {diff.max().item():.3g})")  # fmt: skip


# The big layout is about the launcher (chunks split between launches), which counts elements
# whatever their type: it runs in float32 and float64 (the two accumulation types); bfloat16
# and float16 go through the same launches and are checked at the other layouts.
DTYPE_LAYOUTS = [
    pytest.param(dtype, layout, id=f"{name}-{layout}")
    for dtype, name in zip(DTYPES, DTYPE_IDS)
    for layout in LAYOUTS
    if layout != "big" or dtype in (torch.float32, torch.float64)
]


@pytest.mark.parametrize(("dtype", "layout"), DTYPE_LAYOUTS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_kernel_matches_cpu_kernel_bitwise(family, dtype, layout):
    count = 0
    for op, args in _samples(family, dtype, layout):
        want_args = copy.deepcopy(args)
        want = op(*want_args)
        for seed in _seeds(dtype, layout):
            _C_emu.set_schedule(seed, "fiber")
            _C_emu.reset_stats()
            got_args = copy.deepcopy(args)
            got = _emulated(op)(*got_args)
            what = f"{op._schema.name} sample {count} seed {seed}"
            _assert_bitwise_equal(got, want, what + " (result)")
            _assert_bitwise_equal(got_args, want_args, what + " (arguments)")
            stats = _C_emu.stats()
            if layout == "many":  # more tensors than one launch holds
                assert stats["launches"] >= 2, (what, stats)
            if layout == "big":  # more chunks than one launch holds
                assert stats["max_grid"] == MAX_BLOCKS_PER_LAUNCH, (what, stats)
                assert stats["blocks"] == 323, (what, stats)
        count += 1
    assert count > 0


# ---- the emulation itself ------------------------------------------------------------------------


def _selftest(name, out, blocks, threads):
    torch.ops.hyperlr_ext_emu.selftest(name, out, blocks, threads)
    return out


@pytest.mark.parametrize("mode", ["fiber", "thread"])
def test_block_tree_reduce_and_atomics(mode):
    _C_emu.set_schedule(3, mode)
    sums = _selftest("block_sum", torch.zeros(4), 4, LANES)
    assert torch.equal(sums, torch.full((4,), LANES * (LANES + 1) / 2))
    counters = _selftest("atomics", torch.zeros(5, dtype=torch.int32), 3, 64)
    assert counters[0] == 192 and counters[2] == 191 and counters[3] == 1 and counters[4] == 1
    assert counters[1:2].view(torch.float32).item() == 96.0
    _C_emu.set_schedule(0, "fiber")


def _warp_ops_oracle(threads):
    """What warp_ops_kernel (tests/cuda_emu/selftest.cu) must write for each thread."""
    rows = []
    for t in range(threads):
        warp, lane = divmod(t, 32)
        members = range(warp * 32, warp * 32 + 32)
        down = sum(members) if lane == 0 else None  # only lane 0's tree sum is the warp sum
        prefix = sum(range(warp * 32, t + 1))
        ballot = sum(1 << i for i in range(32) if i % 3 == 0)
        segment = t + 8 if lane % 16 < 8 else t
        low_half = (t ^ 1) if lane < 16 else -1
        rows.append([down, sum(members), prefix, int(10.5 * (warp * 32 + 3) * 2),
                     ballot - (1 << 32) if ballot >= 1 << 31 else ballot,
                     int(warp == 1), 0, segment, low_half])  # fmt: skip
    return rows


@pytest.mark.parametrize("mode", ["fiber", "thread"])
def test_warp_collectives(mode):
    _C_emu.set_schedule(5, mode)
    threads = 96
    out = _selftest("warp_ops", torch.zeros(2 * threads * 9, dtype=torch.int32), 2, threads)
    _C_emu.set_schedule(0, "fiber")
    for block in range(2):
        got = out.view(2, threads, 9)[block].tolist()
        for t, (row, want) in enumerate(zip(got, _warp_ops_oracle(threads))):
            want = [row[0] if w is None else w for w in want]
            assert row == want, (block, t)


def test_shared_memory_is_poisoned_before_each_block():
    out = _selftest("poison", torch.zeros(16, dtype=torch.int32), 2, 64)
    assert torch.equal(out, torch.full((16,), -1, dtype=torch.int32))  # 0xFFFFFFFF: NaN as float


def test_an_empty_grid_is_a_launch_error():
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        _selftest("empty", torch.zeros(1), 0, 32)


def test_the_schedule_exposes_the_old_block_reduce_race():
    """The block reduction before its fix returned lanes[0] to every thread while warp 0 was still
    writing it; with the threads interleaved between barriers, some threads read a partial sum."""
    partial = 0
    for seed in range(4):
        _C_emu.set_schedule(seed, "fiber")
        out = _selftest("racy_block_sum", torch.zeros(LANES), 1, LANES)
        assert out[0] == LANES * (LANES + 1) / 2  # thread 0 itself is right
        partial += int((out != out[0]).sum())
    _C_emu.set_schedule(0, "fiber")
    assert partial > 0


SELFTEST_SOURCE = pathlib.Path(__file__).parent / "cuda_emu" / "selftest.cu"


def _marked_line(marker):
    for number, text in enumerate(SELFTEST_SOURCE.read_text().splitlines(), start=1):
        if text.rstrip().endswith(f"// LINE: {marker}"):
            return f"selftest.cu:{number}"
    raise AssertionError(marker)


@pytest.mark.parametrize(
    "kernel, markers, message, mode",
    [
        ("divergent_syncthreads", ["divergent_syncthreads_a", "divergent_syncthreads_b"],
         "divergent barriers", "fiber"),
        ("divergent_syncthreads", ["divergent_syncthreads_a", "divergent_syncthreads_b"],
         "divergent barriers", "thread"),
        ("divergent_syncwarp", ["divergent_syncwarp_a", "divergent_syncwarp_b"],
         "divergent barriers", "fiber"),
        ("early_return", ["early_return"], "returned while", "fiber"),
        ("shuffle_outside_mask", ["shuffle_outside_mask"], "does not take part", "fiber"),
    ],
)  # fmt: skip
def test_a_kernel_bug_aborts_with_its_source_lines(kernel, markers, message, mode):
    """Run in a child process: the emulation aborts (a GPU would hang or go on silently)."""
    code = (
        "import torch, hyperlr_ext._C_emu as emu\n"
        f"emu.set_schedule(0, {mode!r})\n"
        f"torch.ops.hyperlr_ext_emu.selftest({kernel!r}, torch.zeros(1), 2, 64)\n"
        "print('no report')\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, cwd=pathlib.Path(__file__).parent)  # fmt: skip
    assert child.returncode != 0, child.stdout + child.stderr
    assert message in child.stderr, child.stderr
    for marker in markers:
        assert _marked_line(marker) in child.stderr, (marker, child.stderr)
