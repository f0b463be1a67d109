"""The fused Adam-HD ops (csrc/adam_hd*.{h,cpp}, csrc/cuda/adam_hd.cu) and ``_fused_adam_hd``.

The optimizer-level comparisons (fused vs for-loop, the float64 oracle, determinism) live in
test_optim_fused.py and test_hd_oracle.py; here: opcheck on every op, AMP arguments, bf16/fp16
against a float64 run, thread-count independence, argument errors, and the CUDA kernels against
the CPU ones on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from optim_table import gpu_branch
from test_sgd_hd_ops import log_lr_adam_sample
from torch.library import opcheck

from hyperlr_ext import _ops
from hyperlr_ext.functional.adam_hd import _foreach_adam_hd, _fused_adam_hd, _single_tensor_adam_hd

pytestmark = pytest.mark.skipif(
    not _ops.EXTENSION_AVAILABLE, reason=f"compiled extension unavailable: {_ops.EXTENSION_ERROR}"
)
needs_cuda_kernels = pytest.mark.skipif(
    not (_ops.CUDA_COMPILED and torch.cuda.is_available()),
    reason="needs a CUDA device and the CUDA kernels",
)

SHAPES = [(3, 4), (7,), (0, 2), (2, 3, 5), (), (70000,)]  # a zero-size, a 0-dim, a 2-chunk tensor
SETTINGS = [
    dict(weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False),
    dict(weight_decay=0.02, decoupled_weight_decay=False, amsgrad=True, maximize=True),
    dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False, maximize=False),
]
SETTING_IDS = ["adam", "l2-amsgrad-maximize", "adamw"]


def _state(device, dtype, setting, *, per_tensor, objective, seed=0, shapes=SHAPES):
    """One step's inputs after a few steps: tensor 1 is fresh (step 0, no d_{t-1})."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    n = len(shapes)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    slots = n if per_tensor else 1
    lr_group = torch.rand(slots, generator=gen, dtype=torch.float64).to(device, acc) * 0.01
    fresh = 1
    return dict(
        params=[rnd(s) for s in shapes],
        grads=[rnd(s) for s in shapes],
        exp_avgs=[
            torch.zeros(s, device=device, dtype=dtype) if i == fresh else rnd(s, 0.1)
            for i, s in enumerate(shapes)
        ],  # fmt: skip
        exp_avg_sqs=[
            torch.zeros(s, device=device, dtype=dtype) if i == fresh else rnd(s, 0.1).abs()
            for i, s in enumerate(shapes)
        ],  # fmt: skip
        max_exp_avg_sqs=[
            torch.zeros(s, device=device, dtype=dtype) if i == fresh else rnd(s, 0.2).abs()
            for i, s in enumerate(shapes)
        ]  # fmt: skip
        if setting["amsgrad"]
        else [],
        state_steps=[
            torch.tensor(0.0 if i == fresh else 3.0, dtype=acc, device=device) for i in range(n)
        ],  # fmt: skip
        has_previous=[i != fresh for i in range(n)],
        lrs=list(lr_group.unbind(0)) if per_tensor else [lr_group[0]],
        hypergrads=[torch.zeros((), dtype=acc, device=device) for _ in range(slots)],
        effective_lrs=[torch.full((), 0.004, dtype=acc, device=device) for _ in range(slots)],
        objective_grads=[rnd(s) for s in shapes] if objective else None,
    )


def _step(func, state, setting, *, lr_lag, multiplicative, **amp):
    func(
        **state,
        **amp,
        lr_scale=0.5,
        prev_lr_scale=0.8,
        hyper_lr=0.3 if multiplicative else 1e-4,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        multiplicative=multiplicative,
        lr_lag=lr_lag,
        **setting,
    )


def _flat(state):
    out = []
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "lrs",
                "hypergrads", "effective_lrs"):  # fmt: skip
        out += state[key]
    return out


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("lr_lag", [0, 1])
@pytest.mark.parametrize("multiplicative", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("objective", [False, True])
def test_fused_matches_reference(setting, lr_lag, multiplicative, per_tensor, objective):
    ref = _state("cpu", torch.float64, setting, per_tensor=per_tensor, objective=objective)
    fused = copy.deepcopy(ref)
    if per_tensor:  # slots that are not views of one group tensor: the stacked-copy path
        fused["lrs"] = [lr.clone() for lr in fused["lrs"]]
    for _ in range(2):
        _step(_single_tensor_adam_hd, ref, setting, lr_lag=lr_lag, multiplicative=multiplicative)
        _step(_fused_adam_hd, fused, setting, lr_lag=lr_lag, multiplicative=multiplicative)
        for s in (ref, fused):
            s["has_previous"] = [True] * len(SHAPES)
    assert not torch.equal(ref["lrs"][0], _state("cpu", torch.float64, setting,
                           per_tensor=per_tensor, objective=objective)["lrs"][0])  # fmt: skip
    torch.testing.assert_close(_flat(fused), _flat(ref), rtol=1e-11, atol=1e-13)


def _op_samples(device, dtype, shapes=SHAPES):
    ops = torch.ops.hyperlr_ext
    for setting, per_tensor, objective in [
        (SETTINGS[0], False, False),
        (SETTINGS[1], True, True),
        (SETTINGS[2], False, True),
    ]:
        s = _state(
            device, dtype, setting, per_tensor=per_tensor, objective=objective, shapes=shapes
        )
        slots = [torch.stack(s[k]) for k in ("lrs", "hypergrads", "effective_lrs")]
        steps = torch.stack(s["state_steps"]) + 1
        flags = [int(f) for f in s["has_previous"]]
        amsgrad = setting["amsgrad"]
        reducing = (
            s["params"], s["grads"], s["objective_grads"] or [], s["exp_avgs"], s["exp_avg_sqs"],
            s["max_exp_avg_sqs"], steps, flags, *slots, 0.5, 0.8, 1e-4, 0.9, 0.99, 1e-8,
            setting["weight_decay"], setting["decoupled_weight_decay"], amsgrad,
            setting["maximize"], per_tensor,
        )  # fmt: skip
        amp = (torch.full((1,), 4.0, device=device), torch.zeros(1, device=device))
        second = s["max_exp_avg_sqs"] if amsgrad else s["exp_avg_sqs"]
        param_step = (
            s["params"], s["exp_avgs"], second, steps, slots[2], 0.9, 0.99, 1e-8,
            setting["weight_decay"], setting["decoupled_weight_decay"],
        )  # fmt: skip
        yield from [
            (ops.adam_hd_moments_.default, reducing),
            (ops.adam_hd_moments_.default, (*reducing, *amp)),
            (ops.adam_hd_param_step_.default, param_step),
            (ops.adam_hd_param_step_.default, (*param_step, amp[1])),
            (ops.adam_hd_lagged_step_.default, reducing),
            (ops.adam_hd_lagged_step_.default, (*reducing, *amp)),
        ]
        adam = log_lr_adam_sample(slots[0])  # the Adam step on log eta
        yield from [
            (ops.adam_hd_moments_.default, (*reducing, None, None, *adam)),
            (ops.adam_hd_lagged_step_.default, (*reducing, *amp, *adam)),
        ]


# float32 only: the ops write in place and return nothing, so opcheck's schema, fake-tensor and
# compile checks do not depend on the dtype (the numerics are the other tests' business).
@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_opcheck_cpu(dtype):
    for op, args in _op_samples("cpu", dtype):
        opcheck(op, args)


def test_errors_name_the_argument():
    s = _state("cpu", torch.float32, SETTINGS[0], per_tensor=False, objective=False)
    slots = [torch.stack(s[k]) for k in ("lrs", "hypergrads", "effective_lrs")]
    steps = torch.stack(s["state_steps"])
    n = len(SHAPES)
    head = (s["params"], s["grads"], [], s["exp_avgs"], s["exp_avg_sqs"])
    scalars = (1.0, 1.0, 0.1, 0.9, 0.99, 1e-8, 0.0, False)
    op = torch.ops.hyperlr_ext.adam_hd_moments_
    with pytest.raises(RuntimeError, match="steps must be a contiguous 1-D tensor"):
        op(*head, [], steps[:2], [1] * n, *slots, *scalars, False, False, False)
    with pytest.raises(RuntimeError, match="steps must be Float"):
        op(*head, [], steps.double(), [1] * n, *slots, *scalars, False, False, False)
    with pytest.raises(RuntimeError, match="max_exp_avg_sqs must be given exactly when amsgrad"):
        op(*head, [], steps, [1] * n, *slots, *scalars, True, False, False)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has 5 elements"):
        bad = [s["exp_avgs"][0], torch.zeros(5)] + s["exp_avgs"][2:]
        op(*head[:3], bad, head[4], [], steps, [1] * n, *slots, *scalars, False, False, False)
    with pytest.raises(RuntimeError, match="has_previous"):
        op(*head, [], steps, [1], *slots, *scalars, False, False, False)


@pytest.mark.parametrize(
    "impl",
    [_single_tensor_adam_hd, _foreach_adam_hd, gpu_branch(_foreach_adam_hd), _fused_adam_hd],
    ids=["loop", "foreach", "foreach-gpu-branch", "fused"],
)
@pytest.mark.parametrize("lr_lag", [0, 1])
def test_grad_scale_is_grad_scaler_unscale(impl, lr_lag):
    """With grad_scale S the step equals the step on g * (1 / S) (S = 3: not a power of two)."""
    setting = SETTINGS[1]
    scaled = _state("cpu", torch.float32, setting, per_tensor=False, objective=False)
    unscaled = copy.deepcopy(scaled)
    scale = torch.full((1,), 3.0)
    unscaled["grads"] = [g * scale.reciprocal().reshape(()) for g in scaled["grads"]]
    _step(impl, unscaled, setting, lr_lag=lr_lag, multiplicative=False)
    _step(impl, scaled, setting, lr_lag=lr_lag, multiplicative=False, grad_scale=scale)
    assert all(torch.equal(a, b) for a, b in zip(_flat(scaled), _flat(unscaled)))


@pytest.mark.parametrize(
    "impl",
    [_single_tensor_adam_hd, _foreach_adam_hd, gpu_branch(_foreach_adam_hd), _fused_adam_hd],
    ids=["loop", "foreach", "foreach-gpu-branch", "fused"],
)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("lr_lag", [0, 1])
def test_found_inf_changes_nothing(impl, setting, lr_lag):
    """found_inf != 0: every tensor keeps its bits, step counts included."""
    state = _state("cpu", torch.float32, setting, per_tensor=True, objective=False)
    before = copy.deepcopy(state)
    _step(impl, state, setting, lr_lag=lr_lag, multiplicative=True, found_inf=torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(_flat(before), _flat(state)))
    plain, flagged = copy.deepcopy(before), copy.deepcopy(before)
    _step(impl, plain, setting, lr_lag=lr_lag, multiplicative=True)
    _step(impl, flagged, setting, lr_lag=lr_lag, multiplicative=True, found_inf=torch.zeros(()))
    assert all(torch.equal(a, b) for a, b in zip(_flat(plain), _flat(flagged)))


def _error(state, truth):
    worst = 0.0
    for key in ("params", "lrs"):
        for a, b in zip(state[key], truth[key]):
            if b.numel():
                assert torch.isfinite(a).all() and torch.isfinite(b).all()
                diff = (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)
                worst = max(worst, diff.item())
    return worst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("lr_lag", [0, 1])
@pytest.mark.parametrize("multiplicative", [False, True])
def test_low_precision_within_twice_pytorch_error(dtype, setting, lr_lag, multiplicative):
    """bf16/fp16 params and moments, fp32 math: after 5 steps the fused kernels' error against a
    float64 run from the same start is at most twice that of the pure-PyTorch path."""
    low = _state("cpu", dtype, setting, per_tensor=False, objective=False, seed=5)
    for key in ("lrs", "hypergrads", "effective_lrs", "state_steps"):
        low[key] = [t.float() for t in low[key]]
    fused, torch_path = copy.deepcopy(low), copy.deepcopy(low)
    truth = {}
    for k, v in low.items():
        is_list = isinstance(v, list)
        truth[k] = [t.double() if isinstance(t, torch.Tensor) else t for t in v] if is_list else v
    gen = torch.Generator().manual_seed(7)
    hyper = dict(lr_scale=1.0, prev_lr_scale=1.0, hyper_lr=0.05 if multiplicative else 1e-3)
    adam = dict(beta1=0.9, beta2=0.99, eps=1e-8)
    for step in range(5):
        grads = [0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64) + 0.5
                 for p in truth["params"]]  # fmt: skip
        for func, state in ((_fused_adam_hd, fused), (_single_tensor_adam_hd, torch_path),
                            (_single_tensor_adam_hd, truth)):  # fmt: skip
            state["grads"] = [g.to(state["params"][0].dtype) for g in grads]
            if step:
                state["has_previous"] = [True] * len(SHAPES)
            func(**state, **hyper, **adam, multiplicative=multiplicative, lr_lag=lr_lag, **setting)
    assert truth["lrs"][0] != low["lrs"][0]
    eps = torch.finfo(dtype).eps
    assert _error(fused, truth) <= 2 * _error(torch_path, truth) + eps / 8


def test_thread_count_does_not_change_results():
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            s = _state("cpu", torch.float32, SETTINGS[2], per_tensor=False, objective=False)
            _step(_fused_adam_hd, s, SETTINGS[2], lr_lag=0, multiplicative=True)
        finally:
            torch.set_num_threads(previous)
        results.append(_flat(s))
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ---- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_opcheck_cuda(dtype):
    for op, args in _op_samples("cuda", dtype):
        opcheck(op, args)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("lr_lag", [0, 1])
@pytest.mark.parametrize("multiplicative", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    ids=["float32", "float64", "bfloat16", "float16"],
)
def test_cuda_matches_cpu(setting, lr_lag, multiplicative, per_tensor, dtype):
    """Same math header and reduction order; only pow() in the bias corrections may differ in
    the last bit between the host libm and CUDA, so the comparison allows a few ulps."""
    for seed in range(2):
        cpu = _state("cpu", dtype, setting, per_tensor=per_tensor, objective=seed == 1, seed=seed)
        gpu = _state("cuda", dtype, setting, per_tensor=per_tensor, objective=seed == 1, seed=seed)
        if dtype in (torch.bfloat16, torch.float16):
            for state in (cpu, gpu):
                for key in ("lrs", "hypergrads", "effective_lrs", "state_steps"):
                    state[key] = [t.float() for t in state[key]]
        amp = dict(grad_scale=torch.full((), 8.0), found_inf=torch.zeros(())) if seed else {}
        gpu_amp = {k: v.cuda() for k, v in amp.items()}
        for _ in range(2):
            _step(_fused_adam_hd, cpu, setting, lr_lag=lr_lag, multiplicative=multiplicative, **amp)
            _step(_fused_adam_hd, gpu, setting, lr_lag=lr_lag, multiplicative=multiplicative,
                  **gpu_amp)  # fmt: skip
        for a, b in zip(_flat(cpu), _flat(gpu)):
            torch.testing.assert_close(b.cpu(), a, rtol=8 * torch.finfo(a.dtype).eps, atol=1e-30)


@pytest.mark.skipif(not _ops.EXTENSION_AVAILABLE, reason="compiled extension unavailable")
@pytest.mark.parametrize("lr_lag", [0, 1])
def test_avx2_variant_computes_the_same_bits(lr_lag):
    """The AVX2 and baseline x86-64 variants of the CPU loops give identical results."""
    from hyperlr_ext import _C

    results = []
    was_on = _C.cpu_avx2()
    try:
        for allowed in (False, True):
            _C.set_cpu_avx2(allowed)
            s = _state("cpu", torch.float32, SETTINGS[2], per_tensor=False, objective=True)
            _step(_fused_adam_hd, s, SETTINGS[2], lr_lag=lr_lag, multiplicative=True)
            results.append(_flat(s))
    finally:
        _C.set_cpu_avx2(was_on)
    assert all(torch.equal(a, b) for a, b in zip(*results))
