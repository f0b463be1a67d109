"""The fused tangent step of MARTHE / RTHO (csrc/tangent*.{h,cpp}, csrc/cuda/tangent.cu) against
its pure-PyTorch reference (hyperlr_ext/functional/marthe.py), which shares its signature: every
inner optimizer setting, dtype, the first step, absent Hessian products, non-contiguous, zero-size
and multi-chunk tensors; opcheck on both ops; CUDA against the CPU kernel (GPU only).

The exactness of the tangents themselves (against autograd through unrolled trajectories) is
tested in test_marthe.py, by both paths."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch.library import opcheck

from hyperlr_ext import _ops
from hyperlr_ext.functional._marthe_fused import fused_tangent_adam_step_, fused_tangent_sgd_step_
from hyperlr_ext.functional.marthe import tangent_adam_step_, tangent_sgd_step_

pytestmark = pytest.mark.skipif(
    not _ops.EXTENSION_AVAILABLE, reason=f"compiled extension unavailable: {_ops.EXTENSION_ERROR}"
)
needs_cuda_kernels = pytest.mark.skipif(
    not (_ops.CUDA_COMPILED and torch.cuda.is_available()),
    reason="needs a CUDA device and the CUDA kernels",
)

SHAPES = [(3, 4), (7,), (0, 2), (2, 3, 5), (), (70000,)]  # a zero-size, a 0-dim, a 2-chunk tensor
SMALL_SHAPES = [s for s in SHAPES if math.prod(s) < 1000]  # for opcheck
SGD = {
    "plain": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    "decay": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01),
    "momentum": dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0),
}
ADAM = {
    "adam": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False),
    "adam_l2": dict(beta1=0.6, beta2=0.99, eps=1e-6, weight_decay=0.02,
                    decoupled_weight_decay=False),
    "adamw": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True),
}  # fmt: skip
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float64", "float32", "bfloat16", "float16"]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensors(shapes, dtype, device, gen, *, positive=False, non_contiguous=False):
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if positive:
            t = t.abs() * 0.01
        t = t.to(device=device, dtype=dtype)
        if non_contiguous and t.dim() == 2 and t.numel() > 0:
            t = t.t().contiguous().t()  # same values, transposed strides
        out.append(t)
    return out


def _state(
    inner, setting, dtype, device="cpu", *, seed=0, hvp=True, first_step=False, shapes=SHAPES
):
    """Random lists and scalars for one call (``inner``: "sgd" or "adam")."""
    gen = torch.Generator().manual_seed(seed)
    acc = _acc(dtype)

    def lists(**kw):
        return _tensors(shapes, dtype, device, gen, non_contiguous=True, **kw)

    state = dict(params=lists(), grads=lists(), hvps=lists() if hvp else [], z_params=lists(),
                 directions=lists())  # fmt: skip
    if inner == "sgd":
        has_buffer = setting["momentum"] != 0
        state["momentum_buffers"] = lists() if has_buffer else []
        state["z_buffers"] = lists() if has_buffer else []
        scalars = dict(first_step=first_step, **setting)
    else:
        state.update(exp_avgs=lists(), exp_avg_sqs=lists(positive=True), z_exp_avgs=lists(),
                     z_exp_avg_sqs=lists())  # fmt: skip
        scalars = dict(step=torch.tensor(3.0, dtype=acc, device=device), **setting)
    scalars.update(
        lr=torch.tensor(0.05, dtype=acc, device=device),
        mu=torch.tensor(0.7, dtype=acc, device=device),
        lr_scale=0.5,
    )
    return state, scalars


ORDER = {
    "sgd": ("params", "grads", "hvps", "momentum_buffers", "z_params", "z_buffers", "directions"),
    "adam": ("params", "grads", "hvps", "exp_avgs", "exp_avg_sqs", "z_params", "z_exp_avgs",
             "z_exp_avg_sqs", "directions"),
}  # fmt: skip
STEPS = {
    ("sgd", False): tangent_sgd_step_,
    ("sgd", True): fused_tangent_sgd_step_,
    ("sgd", "foreach"): functools.partial(tangent_sgd_step_, foreach=True),
    ("adam", False): tangent_adam_step_,
    ("adam", True): fused_tangent_adam_step_,
    ("adam", "foreach"): functools.partial(tangent_adam_step_, foreach=True),
}


def _call(inner, fused, state, scalars):
    STEPS[inner, fused](*(state[k] for k in ORDER[inner]), **scalars)


def _tolerance(dtype, want):
    # fp64 / fp32: the same operations in the same order; only pow() in Adam's bias corrections
    # (libm vs torch) may differ in the last bit, which a result formed by cancellation (Z_w)
    # carries as an absolute error of a few ulps of the tensor's scale.
    scale = float(want.abs().max()) if want.numel() else 0.0
    eps = torch.finfo(dtype).eps
    return dict(rtol=8 * eps, atol=16 * eps * scale + 1e-30)


CASES = [("sgd", k, first) for k in SGD for first in (False, True)] + [
    ("adam", k, False) for k in ADAM
]
CASE_IDS = [f"{inner}-{k}{'-first' if first else ''}" for inner, k, first in CASES]


@pytest.mark.parametrize("inner, name, first_step", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "hvp, keep_direction", [(True, True), (False, True), (True, False)],
    ids=["hvp", "no_hvp", "no_direction"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_matches_reference(inner, name, first_step, hvp, keep_direction, dtype):
    setting = (SGD if inner == "sgd" else ADAM)[name]
    state, scalars = _state(inner, setting, dtype, hvp=hvp, first_step=first_step)
    if not keep_direction:
        state["directions"] = []
    expected = copy.deepcopy(state)
    _call(inner, False, expected, scalars)
    _call(inner, True, state, scalars)
    low_precision = dtype in (torch.bfloat16, torch.float16)
    for key in ORDER[inner]:
        for got, want in zip(state[key], expected[key]):
            assert got.stride() == want.stride()  # non-contiguous tensors written in place
            if low_precision:
                # Same fp32 arithmetic; a result may round to the neighbouring bf16/fp16 value.
                torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=1e-6)
            else:
                torch.testing.assert_close(got, want, **_tolerance(dtype, want))
    moved = [
        not torch.equal(a, b)
        for a, b in zip(
            state["params"],
            _state(inner, setting, dtype, hvp=hvp, first_step=first_step)[0]["params"],
        )
        if a.numel()
    ]
    assert all(moved)  # every non-empty parameter took a step


@pytest.mark.parametrize("inner, name, first_step", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("hvp", [True, False], ids=["hvp", "no_hvp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_foreach_is_the_reference_bit_for_bit(inner, name, first_step, hvp, dtype):
    """The list-op tangent step does the reference's operations in the same order: the same bits
    (bf16/fp16 tensors, which the reference upcasts one at a time, take the reference itself)."""
    setting = (SGD if inner == "sgd" else ADAM)[name]
    state, scalars = _state(inner, setting, dtype, hvp=hvp, first_step=first_step)
    expected = copy.deepcopy(state)
    _call(inner, False, expected, scalars)
    _call(inner, "foreach", state, scalars)
    for key in ORDER[inner]:
        for got, want in zip(state[key], expected[key]):
            assert torch.equal(got, want), key
            assert got.stride() == want.stride()


@pytest.mark.parametrize("fused", [False, True, "foreach"], ids=["reference", "fused", "foreach"])
@pytest.mark.parametrize("inner, name, first_step", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_found_inf_skips_and_a_zero_flag_does_not(inner, name, first_step, fused, dtype):
    """found_inf != 0: every tensor the step writes keeps its bits; found_inf == 0: the same
    bits as a call without the argument."""
    setting = (SGD if inner == "sgd" else ADAM)[name]
    state, scalars = _state(inner, setting, dtype, first_step=first_step)
    before = copy.deepcopy(state)
    _call(inner, fused, state, dict(scalars, found_inf=torch.ones(1)))
    for key in ORDER[inner]:
        assert all(torch.equal(a, b) for a, b in zip(state[key], before[key])), key
    plain = copy.deepcopy(state)
    _call(inner, fused, state, dict(scalars, found_inf=torch.zeros(1)))
    _call(inner, fused, plain, scalars)
    for key in ORDER[inner]:
        assert all(torch.equal(a, b) for a, b in zip(state[key], plain[key])), key
    assert not torch.equal(state["params"][0], before["params"][0])


def test_missing_hvps_count_as_zero():
    state, scalars = _state("adam", ADAM["adam_l2"], torch.float64, hvp=False)
    zeros = copy.deepcopy(state)
    zeros["hvps"] = [torch.zeros_like(p) for p in zeros["params"]]
    _call("adam", True, state, scalars)
    _call("adam", True, zeros, scalars)
    for key in ORDER["adam"]:
        if key != "hvps":
            assert all(torch.equal(a, b) for a, b in zip(state[key], zeros[key]))


def test_errors_name_the_argument():
    state, scalars = _state("sgd", SGD["momentum"], torch.float32)
    bad = dict(scalars, lr=scalars["lr"].double())
    with pytest.raises(RuntimeError, match="lr must be Float"):
        _call("sgd", True, state, bad)
    short = dict(state, z_buffers=state["z_buffers"][:-1])
    with pytest.raises(RuntimeError, match="z_buffers must have one tensor per param"):
        _call("sgd", True, short, scalars)
    no_buffers = dict(state, momentum_buffers=[], z_buffers=[])
    with pytest.raises(RuntimeError, match="momentum_buffers must have one tensor per param"):
        _call("sgd", True, no_buffers, scalars)
    with pytest.raises(RuntimeError, match="momentum_buffers and z_buffers must be given exactly"):
        _call("sgd", True, state, dict(scalars, momentum=0.0, dampening=0.0))
    state, scalars = _state("adam", ADAM["adam"], torch.float32)
    with pytest.raises(RuntimeError, match="step must be a 0-dim tensor"):
        _call("adam", True, state, dict(scalars, step=scalars["step"].reshape(1)))
    with pytest.raises(RuntimeError, match="found_inf"):
        _call("adam", True, state, dict(scalars, found_inf=torch.ones(1, dtype=torch.float64)))


def _op_samples(device, dtype, shapes=SMALL_SHAPES):
    for inner, name, first in (("sgd", "momentum", False), ("sgd", "plain", True),
                               ("adam", "adamw", False)):  # fmt: skip
        setting = (SGD if inner == "sgd" else ADAM)[name]
        state, scalars = _state(inner, setting, dtype, device, first_step=first, shapes=shapes)
        state = {k: [t.contiguous() for t in v] for k, v in state.items()}
        args = [state[k] for k in ORDER[inner]]
        if inner == "sgd":
            op = torch.ops.hyperlr_ext.tangent_sgd_step_.default
            args += [scalars[k] for k in ("lr", "mu", "lr_scale", "momentum", "dampening",
                                          "nesterov", "weight_decay", "first_step")]  # fmt: skip
        else:
            op = torch.ops.hyperlr_ext.tangent_adam_step_.default
            args += [scalars[k] for k in ("lr", "mu", "step", "lr_scale", "beta1", "beta2", "eps",
                                          "weight_decay", "decoupled_weight_decay")]  # fmt: skip
        yield op, tuple(args)
        for flag in (0.0, 1.0):  # AMP's found_inf: a step taken, a step skipped
            found_inf = torch.full((1,), flag, dtype=torch.float32, device=device)
            yield op, (*args, found_inf)


# float32 only: the ops write in place and return nothing, so opcheck's schema, fake-tensor and
# compile checks do not depend on the dtype (the numerics are the other tests' business).
@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_opcheck_cpu(dtype):
    for op, args in _op_samples("cpu", dtype):
        opcheck(op, args)


# ---- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck_cuda(dtype):
    for op, args in _op_samples("cuda", dtype):
        opcheck(op, args)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("inner, name, first_step", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_matches_cpu(inner, name, first_step, dtype):
    """One math header: the CUDA kernel computes the CPU kernel's bits (up to pow() in the bias
    corrections, and bf16/fp16 rounding of a result on the boundary)."""
    setting = (SGD if inner == "sgd" else ADAM)[name]
    cpu_state, cpu_scalars = _state(inner, setting, dtype, "cpu", first_step=first_step)
    gpu_state, gpu_scalars = _state(inner, setting, dtype, "cuda", first_step=first_step)
    _call(inner, True, cpu_state, cpu_scalars)
    _call(inner, True, gpu_state, gpu_scalars)
    for key in ORDER[inner]:
        for got, want in zip(gpu_state[key], cpu_state[key]):
            if dtype in (torch.bfloat16, torch.float16):
                torch.testing.assert_close(got.cpu(), want, rtol=torch.finfo(dtype).eps, atol=1e-6)
            else:
                torch.testing.assert_close(got.cpu(), want, **_tolerance(dtype, want))


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("inner, name, first_step", CASES, ids=CASE_IDS)
def test_cuda_found_inf_skips(inner, name, first_step):
    """The CUDA kernel's found_inf branch: a flagged step writes nothing."""
    setting = (SGD if inner == "sgd" else ADAM)[name]
    state, scalars = _state(inner, setting, torch.float32, "cuda", first_step=first_step)
    before = copy.deepcopy(state)
    _call(inner, True, state, dict(scalars, found_inf=torch.ones(1, device="cuda")))
    for key in ORDER[inner]:
        assert all(torch.equal(a, b) for a, b in zip(state[key], before[key])), key
