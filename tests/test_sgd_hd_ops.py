"""The fused SGD-HD ops (csrc/sgd_hd*.{h,cpp}, csrc/cuda/sgd_hd.cu) and ``_fused_sgd_hd``.

opcheck on every op; the functional entry against the for-loop reference on random data with every
flag mixed (stale tensors, fresh buffers, per-tensor slots that are not the group tensor); the CUDA
kernels against the CPU ones, bit for bit (same math header, same reduction order), on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from optim_table import gpu_branch
from torch.library import opcheck

from hyperlr_ext import _ops
from hyperlr_ext.functional.sgd_hd import _foreach_sgd_hd, _fused_sgd_hd, _single_tensor_sgd_hd

pytestmark = pytest.mark.skipif(
    not _ops.EXTENSION_AVAILABLE, reason=f"compiled extension unavailable: {_ops.EXTENSION_ERROR}"
)
needs_cuda_kernels = pytest.mark.skipif(
    not (_ops.CUDA_COMPILED and torch.cuda.is_available()),
    reason="needs a CUDA device and the CUDA kernels",
)

SHAPES = [(3, 4), (7,), (0, 2), (2, 3, 5), (), (70000,)]  # a zero-size, a 0-dim, a 2-chunk tensor
SETTINGS = [
    dict(momentum=0.0, nesterov=False, dampening=0.0, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, nesterov=False, dampening=0.3, weight_decay=0.01, maximize=True),
    dict(momentum=0.9, nesterov=True, dampening=0.0, weight_decay=0.01, maximize=False),
]
SETTING_IDS = ["sgd", "momentum", "nesterov"]


def _state(device, dtype, setting, *, per_tensor, objective, seed=0, shapes=SHAPES):
    """Random inputs of one step: tensor 1 is fresh (no buffer, no d_{t-1}), tensor 3 is stale
    (buffer, but skipped last step: no d_{t-1}), the others have everything."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)

    n = len(shapes)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    slots = n if per_tensor else 1
    lr_group = torch.rand(slots, generator=gen, dtype=torch.float64).to(device, acc) * 0.1
    fresh, stale = 1, 3
    plain_momentum = setting["momentum"] != 0 and not setting["nesterov"]
    return dict(
        params=[rnd(s) for s in shapes],
        grads=[rnd(s) for s in shapes],
        momentum_buffers=[
            None if i == fresh or setting["momentum"] == 0 else rnd(s) for i, s in enumerate(shapes)
        ],
        prev_directions=[
            None if i == fresh or plain_momentum else rnd(s) for i, s in enumerate(shapes)
        ],
        has_previous=[i not in (fresh, stale) for i in range(n)],
        lrs=list(lr_group.unbind(0)) if per_tensor else [lr_group[0]],
        hypergrads=[torch.zeros((), dtype=acc, device=device) for _ in range(slots)],
        effective_lrs=[torch.zeros((), dtype=acc, device=device) for _ in range(slots)],
        objective_grads=[rnd(s) for s in shapes] if objective else None,
    )


def _step(func, state, setting, *, lr_lag, multiplicative, **amp):
    func(
        **state,
        **amp,
        lr_scale=0.5,
        prev_lr_scale=0.8,
        hyper_lr=0.3 if multiplicative else 0.05,
        multiplicative=multiplicative,
        lr_lag=lr_lag,
        **setting,
    )


def _flat(state):
    out = []
    for key in ("params", "momentum_buffers", "prev_directions", "lrs", "hypergrads"):
        out += [t for t in state[key] if t is not None]
    out += state["effective_lrs"]
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
    _step(_single_tensor_sgd_hd, ref, setting, lr_lag=lr_lag, multiplicative=multiplicative)
    _step(_fused_sgd_hd, fused, setting, lr_lag=lr_lag, multiplicative=multiplicative)
    # Sums of 70,000 products in another order: LR errors of ~1e-15 that reach the params.
    torch.testing.assert_close(_flat(fused), _flat(ref), rtol=1e-11, atol=1e-12)


def log_lr_adam_sample(lrs):
    """The hyper_state / hyper_adam arguments of the Adam step on log eta for the slots ``lrs``:
    a state some steps in ((m, v, beta1^n, beta2^n) per slot) and its settings, with bounds
    that the samples' LRs can reach."""
    state = torch.tensor([2e-3, 1e-5, 0.9**3, 0.99**3], dtype=lrs.dtype, device=lrs.device)
    state = (
        state * torch.linspace(1.0, 2.0, lrs.numel(), dtype=lrs.dtype, device=lrs.device)[:, None]
    )
    state[:, 2:] = torch.tensor([0.9**3, 0.99**3], dtype=lrs.dtype)
    return state.contiguous(), [0.9, 0.99, 1e-20, 1e-4, 0.5]


def _op_samples(device, dtype, shapes=SHAPES):
    """(op, args) for opcheck: each op in each mode of its lists."""
    for setting, per_tensor, objective in [
        (SETTINGS[0], False, False),
        (SETTINGS[1], True, True),
        (SETTINGS[2], False, True),
    ]:
        s = _state(
            device, dtype, setting, per_tensor=per_tensor, objective=objective, shapes=shapes
        )
        params = s["params"]
        buffers = [
            torch.zeros_like(p) if b is None else b for p, b in zip(params, s["momentum_buffers"])
        ]
        directions = [
            torch.zeros_like(p) if d is None else d for p, d in zip(params, s["prev_directions"])
        ]
        momentum = setting["momentum"]
        buffers = buffers if momentum != 0 else []
        directions = directions if momentum == 0 or setting["nesterov"] else []
        flags = [int(f) for f in s["has_previous"]]
        has_buffer = [int(b is not None) for b in s["momentum_buffers"]]
        slots = [torch.stack(s[k]) for k in ("lrs", "hypergrads", "effective_lrs")]
        objective_grads = s["objective_grads"] or []
        wd, damp, nest, maxi = (
            setting[k] for k in ("weight_decay", "dampening", "nesterov", "maximize")
        )
        amp = (torch.full((1,), 4.0, device=device), torch.zeros(1, device=device))
        reducing = (
            params, s["grads"], objective_grads, buffers, directions, flags, has_buffer, *slots,
            0.5, 0.8, 0.05, wd, momentum, damp, nest, maxi, per_tensor,
        )  # fmt: skip
        new_directions = buffers if momentum != 0 and not setting["nesterov"] else directions
        ops = torch.ops.hyperlr_ext
        yield from [
            (ops.sgd_hd_direction_.default, reducing),
            (ops.sgd_hd_direction_.default, (*reducing, *amp)),
            (ops.sgd_hd_param_step_.default, (params, new_directions, slots[2])),
            (ops.sgd_hd_param_step_.default, (params, new_directions, slots[2], amp[1])),
            (ops.sgd_hd_lagged_step_.default, reducing),
            (ops.sgd_hd_lagged_step_.default, (*reducing, *amp)),
        ]
        # The Adam step on log eta (the multiplicative flag of these samples is ignored then).
        adam = log_lr_adam_sample(slots[0])
        yield from [
            (ops.sgd_hd_direction_.default, (*reducing, None, None, *adam)),
            (ops.sgd_hd_lagged_step_.default, (*reducing, *amp, *adam)),
        ]


# float32 only: the ops write in place and return nothing, so opcheck's schema, fake-tensor and
# compile checks do not depend on the dtype (the numerics are the other tests' business).
@pytest.mark.parametrize("dtype", [torch.float32], ids=["float32"])
def test_opcheck_cpu(dtype):
    for op, args in _op_samples("cpu", dtype):
        opcheck(op, args)


def test_errors_name_the_argument():
    s = _state("cpu", torch.float32, SETTINGS[0], per_tensor=False, objective=False)
    lr = torch.stack(s["lrs"])
    n = len(SHAPES)
    dirs = [torch.zeros_like(p) for p in s["params"]]
    head = [s["params"], s["grads"], [], [], dirs]
    flags = [[1] * n, [0] * n]
    scalars = (1.0, 1.0, 0.1, 0.0, 0.0, 0.0, False, False, False)
    op = torch.ops.hyperlr_ext.sgd_hd_direction_
    with pytest.raises(RuntimeError, match="has_previous"):
        op(*head, [1], flags[1], lr, lr.clone(), lr.clone(), *scalars)
    with pytest.raises(RuntimeError, match="lrs must be"):
        op(*head, *flags, lr.double(), lr.clone(), lr.clone(), *scalars)
    with pytest.raises(RuntimeError, match=r"grads\[2\] has 2 elements"):
        bad = s["grads"][:2] + [torch.zeros(2)] + s["grads"][3:]
        op(s["params"], bad, *head[2:], *flags, lr, lr.clone(), lr.clone(), *scalars)
    with pytest.raises(RuntimeError, match="prev_directions must be given"):
        op(*head[:4], [], *flags, lr, lr.clone(), lr.clone(), *scalars)
    with pytest.raises(RuntimeError, match="grad_scale must be a float32 tensor with one"):
        op(*head, *flags, lr, lr.clone(), lr.clone(), *scalars, torch.ones(2), None)
    with pytest.raises(RuntimeError, match="found_inf must be a float32"):
        op(*head, *flags, lr, lr.clone(), lr.clone(), *scalars, None, torch.zeros(1).double())
    ints = [p.int() for p in s["params"]]
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 and float16"):
        op(ints, [g.int() for g in s["grads"]], [], [], [d.int() for d in dirs], *flags, lr,
           lr.clone(), lr.clone(), *scalars)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"directions\[1\]"):
        torch.ops.hyperlr_ext.sgd_hd_param_step_(
            s["params"], [dirs[0], torch.zeros(5)] + dirs[2:], lr
        )


@pytest.mark.parametrize(
    "impl",
    [_single_tensor_sgd_hd, _foreach_sgd_hd, gpu_branch(_foreach_sgd_hd), _fused_sgd_hd],
    ids=["loop", "foreach", "foreach-gpu-branch", "fused"],
)
@pytest.mark.parametrize("lr_lag", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_grad_scale_is_grad_scaler_unscale(impl, lr_lag, dtype):
    """With grad_scale S the step equals the step on g * (1 / S) (S = 3: not a power of two)."""
    setting = SETTINGS[1]
    scaled = _state("cpu", dtype, setting, per_tensor=False, objective=False)
    unscaled = copy.deepcopy(scaled)
    scale = torch.full((1,), 3.0)
    unscaled["grads"] = [g * scale.reciprocal().reshape(()) for g in scaled["grads"]]
    _step(impl, unscaled, setting, lr_lag=lr_lag, multiplicative=False)
    _step(impl, scaled, setting, lr_lag=lr_lag, multiplicative=False, grad_scale=scale)
    assert all(torch.equal(a, b) for a, b in zip(_flat(scaled), _flat(unscaled)))


@pytest.mark.parametrize(
    "impl",
    [_single_tensor_sgd_hd, _foreach_sgd_hd, gpu_branch(_foreach_sgd_hd), _fused_sgd_hd],
    ids=["loop", "foreach", "foreach-gpu-branch", "fused"],
)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("lr_lag", [0, 1])
def test_found_inf_changes_nothing(impl, setting, lr_lag):
    """found_inf != 0: every existing tensor keeps its bits; buffers the step creates hold 0."""
    state = _state("cpu", torch.float32, setting, per_tensor=True, objective=False)
    before = copy.deepcopy(state)
    _step(impl, state, setting, lr_lag=lr_lag, multiplicative=True, found_inf=torch.ones(1))
    for key in ("params", "momentum_buffers", "prev_directions", "lrs", "hypergrads"):
        for old, new in zip(before[key], state[key]):
            if old is None:
                assert new is None or torch.equal(new, torch.zeros_like(new))
            else:
                assert torch.equal(old, new)
    assert all(torch.equal(a, b) for a, b in zip(before["effective_lrs"], state["effective_lrs"]))
    # found_inf == 0 is an ordinary step.
    plain, flagged = copy.deepcopy(before), copy.deepcopy(before)
    _step(impl, plain, setting, lr_lag=lr_lag, multiplicative=True)
    _step(impl, flagged, setting, lr_lag=lr_lag, multiplicative=True, found_inf=torch.zeros(1))
    assert all(torch.equal(a, b) for a, b in zip(_flat(plain), _flat(flagged)))


def _error(state, truth):
    """Largest error of the params and LRs against the float64 run, relative to their scale."""
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
    """bf16/fp16 params, fp32 math: after 5 steps the fused kernels' error against a float64 run
    from the same start is at most twice that of the pure-PyTorch path at the same precision."""
    low = _state("cpu", dtype, setting, per_tensor=False, objective=False, seed=5)
    for key in ("lrs", "hypergrads", "effective_lrs"):
        low[key] = [t.float() for t in low[key]]
    fused, torch_path = copy.deepcopy(low), copy.deepcopy(low)
    truth = {}
    for k, v in low.items():
        double = isinstance(v, list)
        truth[k] = [t.double() if isinstance(t, torch.Tensor) else t for t in v] if double else v
    gen = torch.Generator().manual_seed(7)
    hyper = dict(lr_scale=1.0, prev_lr_scale=1.0, hyper_lr=0.05 if multiplicative else 1e-6)
    for step in range(5):
        # Gradients correlated with the last ones, so that the LR moves.
        grads = [0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64) + 0.5
                 for p in truth["params"]]  # fmt: skip
        for func, state in ((_fused_sgd_hd, fused), (_single_tensor_sgd_hd, torch_path),
                            (_single_tensor_sgd_hd, truth)):  # fmt: skip
            state["grads"] = [g.to(state["params"][0].dtype) for g in grads]
            if step:
                state["has_previous"] = [True] * len(SHAPES)
            func(**state, **hyper, multiplicative=multiplicative, lr_lag=lr_lag, **setting)
    assert truth["lrs"][0] != low["lrs"][0]
    eps = torch.finfo(dtype).eps
    assert _error(fused, truth) <= 2 * _error(torch_path, truth) + eps / 8


def test_thread_count_does_not_change_results():
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            s = _state("cpu", torch.float32, SETTINGS[1], per_tensor=False, objective=False)
            _step(_fused_sgd_hd, s, SETTINGS[1], lr_lag=0, multiplicative=True)
        finally:
            torch.set_num_threads(previous)
        results.append(_flat(s))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_torch_compile_fullgraph():
    """The ops trace into one graph (mutable list arguments functionalised) and compute the same."""
    ops = torch.ops.hyperlr_ext

    def step(params, grads, buffers, lrs, hypergrads, effective_lrs):
        flags = [1] * len(params)
        slots = (lrs, hypergrads, effective_lrs)
        ops.sgd_hd_lagged_step_(
            params, grads, [], buffers, [], flags, flags, *slots,
            1.0, 1.0, 0.01, 0.0, 0.9, 0.0, False, False, False,
        )  # fmt: skip
        ops.sgd_hd_direction_(
            params, grads, [], buffers, [], flags, flags, *slots,
            1.0, 1.0, 0.01, 0.0, 0.9, 0.0, False, False, False,
        )  # fmt: skip
        ops.sgd_hd_param_step_(params, buffers, effective_lrs)

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(10, generator=gen), torch.randn(3, 4, generator=gen)]
    inputs = (
        params,
        [torch.randn(p.shape, generator=gen) for p in params],
        [torch.randn(p.shape, generator=gen) for p in params],
        torch.full((1,), 0.1),
        torch.zeros(1),
        torch.zeros(1),
    )
    eager, compiled = copy.deepcopy(inputs), copy.deepcopy(inputs)
    step(*eager)
    torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    for a, b in zip(
        eager[0] + eager[2] + list(eager[3:]), compiled[0] + compiled[2] + list(compiled[3:])
    ):
        assert torch.equal(a, b)


# ---- CUDA -------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "float64", "bfloat16", "float16"]


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
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_matches_cpu_bitwise(setting, lr_lag, multiplicative, per_tensor, dtype):
    for seed in range(3):  # fresh random data each time
        cpu = _state("cpu", dtype, setting, per_tensor=per_tensor, objective=seed == 2, seed=seed)
        gpu = _state("cuda", dtype, setting, per_tensor=per_tensor, objective=seed == 2, seed=seed)
        if dtype in (torch.bfloat16, torch.float16):
            for state in (cpu, gpu):
                for key in ("lrs", "hypergrads", "effective_lrs"):
                    state[key] = [t.float() for t in state[key]]
        # seed 1 with AMP: a grad scale to divide by, and no inf found
        amp = {}
        if seed == 1:
            amp = dict(grad_scale=torch.full((), 8.0), found_inf=torch.zeros(()))
        gpu_amp = {k: v.cuda() for k, v in amp.items()}
        for _ in range(2):  # the second step has the buffers the first one created
            _step(_fused_sgd_hd, cpu, setting, lr_lag=lr_lag, multiplicative=multiplicative, **amp)
            _step(_fused_sgd_hd, gpu, setting, lr_lag=lr_lag, multiplicative=multiplicative,
                  **gpu_amp)  # fmt: skip
            cpu["has_previous"] = [True] * len(SHAPES)
            gpu["has_previous"] = [True] * len(SHAPES)
        for a, b in zip(_flat(cpu), _flat(gpu)):
            assert torch.equal(a, b.cpu()), (a, b)


@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_many_tensors_and_graph_capture():
    """More tensors than one launch holds, per-tensor slots, and a CUDA graph replay."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n = 300
    params = [torch.randn(1000 + i, device="cuda", generator=gen) for i in range(n)]
    grads = [torch.randn_like(p) for p in params]
    lr_group = torch.full((n,), 0.01, device="cuda")
    state = dict(
        params=params, grads=grads, momentum_buffers=[torch.zeros_like(p) for p in params],
        prev_directions=[None] * n, has_previous=[True] * n, lrs=list(lr_group.unbind(0)),
        hypergrads=list(torch.zeros(n, device="cuda").unbind(0)),
        effective_lrs=list(torch.zeros(n, device="cuda").unbind(0)), objective_grads=None,
    )  # fmt: skip
    cpu_state = {
        k: (None if v is None else [t if not isinstance(t, torch.Tensor) else t.cpu() for t in v])
        for k, v in state.items()
    }
    cpu_state["lrs"] = list(lr_group.cpu().unbind(0))
    setting = SETTINGS[1]
    _step(_fused_sgd_hd, state, setting, lr_lag=0, multiplicative=False)
    _step(_fused_sgd_hd, cpu_state, setting, lr_lag=0, multiplicative=False)
    for a, b in zip(_flat(cpu_state), _flat(state)):
        assert torch.equal(a, b.cpu())

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _step(_fused_sgd_hd, state, setting, lr_lag=1, multiplicative=False)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        _step(_fused_sgd_hd, state, setting, lr_lag=1, multiplicative=False)
    before = lr_group.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(before, lr_group)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("lr_lag", [0, 1])
def test_cuda_graph_captures_a_training_step(lr_lag):
    """Forward, backward and SGDHD(fused=True).step() captured in one CUDA graph: replays give the
    same weights and LR as the same steps run eagerly (no host sync, no CPU-side LR)."""
    import hyperlr_ext as hx

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    ).cuda()
    eager = copy.deepcopy(model)
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 1, device="cuda")

    def make(m):
        return hx.SGDHD(m.parameters(), lr=0.01, hyper_lr=1e-3, momentum=0.9, fused=True,
                        lr_lag=lr_lag)  # fmt: skip

    opt, eager_opt = make(model), make(eager)

    def step(m, o):
        o.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: creates the optimizer state outside the capture
            step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        step(eager, eager_opt)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for _ in range(5):
        graph.replay()
        eager_opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(eager(x), y).backward()
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        opt.param_groups[0]["learned_lr"], eager_opt.param_groups[0]["learned_lr"]
    )
    assert not torch.equal(
        opt.param_groups[0]["learned_lr"], torch.full_like(opt.param_groups[0]["learned_lr"], 0.01)
    )
