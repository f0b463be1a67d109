"""TLR (hyperlr_ext/schedulers/tlr.py) against an oracle written from docs/design.md, TLR /
the paper's Eq. 8 with windows: several param groups, optimizers whose direction is not the gradient
(momentum, Adam), the closed form on 1/2 a w^2, the cap and the den <= 0 guard, state_dict
round trips, no host sync with a tensor LR, the fused window end against its reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from sync_guard import NoSync
from torch.library import opcheck

import hyperlr_ext as hx
from hyperlr_ext import _ops
from hyperlr_ext.functional.tlr import fused_tlr_window_, tlr_window_

needs_extension = pytest.mark.skipif(
    not _ops.EXTENSION_AVAILABLE, reason=f"compiled extension unavailable: {_ops.EXTENSION_ERROR}"
)
needs_cuda_kernels = pytest.mark.skipif(
    not (_ops.CUDA_COMPILED and torch.cuda.is_available()),
    reason="needs a CUDA device and the CUDA kernels",
)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 5, generator=gen, dtype=torch.float64),
         torch.randn(16, 2, generator=gen, dtype=torch.float64))
        for _ in range(n)
    ]  # fmt: skip


def _train_step(model, opt, batch):
    opt.zero_grad()
    x, y = batch
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _groups(model, lrs):
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    return [{"params": first, "lr": lrs[0]}, {"params": second, "lr": lrs[1]}]


OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1),
    "momentum": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.01),
}


def _oracle(model, make_opt, lrs, batches, *, gamma, k, max_factor):
    """Eq. 8 with K-step windows, written out: per group u_k = (w_snap - w) / eta,
    eta *= min(1 + gamma <u_{k-1}, u_k> / (|u_{k-1}|^2 - <u_{k-1}, u_k>), max_factor) if the
    denominator is positive. Returns the LR history and the final weights."""
    opt = make_opt(_groups(model, lrs))
    snaps = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    prev = [None] * len(opt.param_groups)
    history = []
    for t, batch in enumerate(batches, start=1):
        _train_step(model, opt, batch)
        if t % k == 0:
            for i, g in enumerate(opt.param_groups):
                eta = g["lr"]
                u = torch.cat(
                    [(s - p.detach()).reshape(-1) / eta for s, p in zip(snaps[i], g["params"])]
                )
                if prev[i] is not None:
                    num = float(prev[i] @ u)
                    den = float(prev[i] @ prev[i]) - num
                    if den > 0:
                        g["lr"] = eta * min(1 + gamma * num / den, max_factor)
                prev[i] = u
                snaps[i] = [p.detach().clone() for p in g["params"]]
        history.append([g["lr"] for g in opt.param_groups])
    return history, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_the_oracle(name, fused):
    batches = _batches(24)
    lrs = (0.05, 0.02) if name != "adam" else (0.01, 0.003)
    settings = dict(gamma=0.33, k=3, max_factor=100.0)
    history, weights = _oracle(_model(), OPTIMIZERS[name], lrs, batches, **settings)

    model = _model()
    opt = OPTIMIZERS[name](_groups(model, lrs))
    sched = hx.TLR(opt, gamma=0.33, update_every=3, fused=fused)
    for t, batch in enumerate(batches):
        _train_step(model, opt, batch)
        sched.step()
        got = [g["lr"] for g in opt.param_groups]
        assert got == pytest.approx(history[t], rel=1e-10, abs=0)
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
    for p, q in zip(model.parameters(), weights):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
    assert history[-1] != [pytest.approx(lr) for lr in lrs]  # the LRs moved


def _quadratic_run(a, lr, *, gamma, windows, max_factor=100.0, sign=1.0):
    w = torch.nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=lr)
    sched = hx.TLR(opt, gamma=gamma, update_every=1, max_factor=max_factor)
    lrs = []
    for _ in range(windows):
        opt.zero_grad()
        (sign * 0.5 * a * w * w).sum().backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_newton_step_lands_on_one_over_a():
    """1/2 a w^2, plain SGD, gamma = 1, K = 1: u_1 = a w_0, u_2 = a (1 - eta a) w_0, so
    eta (1 + num / den) = 1 / a exactly (the first change, at the end of the second window)."""
    a = 4.0
    lrs = _quadratic_run(a, 0.05, gamma=1.0, windows=2)
    assert lrs[0] == 0.05  # the first window only records u_1
    assert lrs[1] == pytest.approx(1 / a, rel=1e-14)


def test_the_cap_bounds_one_update():
    """eta_0 = 1e-6 / a would be multiplied by 1e6: the cap makes it exactly max_factor eta_0."""
    a, lr = 4.0, 1e-6 / 4.0
    assert _quadratic_run(a, lr, gamma=1.0, windows=2, max_factor=100.0)[1] == 100.0 * lr


def test_non_positive_denominator_leaves_the_lr():
    """On -1/2 a w^2 the steps grow along one direction: <u1, u2> > |u1|^2, den < 0: unchanged."""
    lrs = _quadratic_run(2.0, 0.1, gamma=0.5, windows=4, sign=-1.0)
    assert lrs == [0.1] * 4


def test_window_length_from_the_epoch_fraction():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert hx.TLR(opt, p=0.2, steps_per_epoch=23).update_every == math.ceil(0.2 * 23)
    assert hx.TLR(opt, update_every=7).update_every == 7


def test_errors():
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    for kwargs, match in (
        (dict(update_every=3, gamma=0.0), "gamma"),
        (dict(update_every=3, gamma=1.5), "gamma"),
        (dict(update_every=0), "update_every"),
        (dict(), "update_every"),
        (dict(update_every=3, max_factor=0.5), "max_factor"),
        (dict(steps_per_epoch=10, p=0.0), "p"),
    ):
        with pytest.raises(ValueError, match=match):
            hx.TLR(opt, **kwargs)
    with pytest.raises(TypeError):
        hx.TLR(object(), update_every=3)  # not an optimizer


def test_state_dict_resume_is_bit_identical():
    batches = _batches(20)
    model = _model()
    opt = torch.optim.SGD(_groups(model, (0.05, 0.02)), lr=0.1, momentum=0.9)
    sched = hx.TLR(opt, gamma=0.5, update_every=3)
    for batch in batches[:10]:  # stops inside a window
        _train_step(model, opt, batch)
        sched.step()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    for batch in batches[10:]:
        _train_step(model, opt, batch)
        sched.step()

    model2 = _model(seed=5)
    opt2 = torch.optim.SGD(_groups(model2, (0.05, 0.02)), lr=0.1, momentum=0.9)
    sched2 = hx.TLR(opt2, gamma=0.5, update_every=3)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    for batch in batches[10:]:
        _train_step(model2, opt2, batch)
        sched2.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
    bad = copy.deepcopy(saved[2])
    bad["snapshots"] = bad["snapshots"][:1]
    with pytest.raises(ValueError, match="snapshots"):
        sched2.load_state_dict(bad)


@pytest.mark.parametrize("fused", [False, None])
def test_tensor_lr_is_updated_in_place_without_a_host_read(fused):
    model = _model()
    lr = torch.tensor(0.05, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = hx.TLR(opt, gamma=0.5, update_every=2, fused=fused)
    for batch in _batches(8):
        _train_step(model, opt, batch)  # torch's SGD reads a tensor lr itself
        with NoSync():
            sched.step()
    assert opt.param_groups[0]["lr"] is lr and lr != 0.05


# ---- the fused window end ---------------------------------------------------------------------

SHAPES = [(3, 4), (7,), (0, 2), (2, 3, 5), (), (70000,)]


def _window_state(dtype, device="cpu", seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)

    def lists():
        return [
            torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes
        ]

    params, snapshots, prevs = lists(), lists(), lists()
    params[0] = params[0].t().contiguous().t()  # a non-contiguous param
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return params, snapshots, prevs, torch.tensor(0.03, dtype=acc, device=device)


@needs_extension
@pytest.mark.parametrize("has_previous", [True, False])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    ids=["float64", "float32", "bfloat16", "float16"],
)  # fmt: skip
def test_fused_window_matches_reference(dtype, has_previous):
    params, snaps, prevs, lr = _window_state(dtype)
    ref_snaps, ref_prevs = copy.deepcopy(snaps), copy.deepcopy(prevs)
    got = fused_tlr_window_(params, snaps, prevs, lr, has_previous=has_previous)
    want = tlr_window_(params, ref_snaps, ref_prevs, lr, has_previous=has_previous)
    # Sums of 70k products in another order: a few ulps of the accumulation type, relative to
    # the sum of magnitudes.
    scale = sum(float(p.double().abs().sum()) for p in prevs) ** 2 + 1.0
    eps = torch.finfo(lr.dtype).eps
    torch.testing.assert_close(got, want, rtol=0, atol=64 * eps * scale / 1e3 + 1e-30)
    if not has_previous:
        assert torch.equal(got, torch.zeros_like(got))
    for a, b in zip(snaps, ref_snaps):
        assert torch.equal(a, b)
    for a, b in zip(prevs, ref_prevs):
        torch.testing.assert_close(a, b, rtol=torch.finfo(dtype).eps, atol=0)


@needs_extension
def test_opcheck_window():
    params, snaps, prevs, lr = _window_state(torch.float32)
    keep = [i for i, p in enumerate(params) if p.numel() < 1000]
    args = ([params[i].contiguous() for i in keep], [snaps[i] for i in keep],
            [prevs[i] for i in keep], lr, True)  # fmt: skip
    opcheck(torch.ops.hyperlr_ext.tlr_window_.default, args)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_cuda_window_matches_cpu(dtype):
    cpu_state = _window_state(dtype)
    gpu_state = _window_state(dtype, "cuda")
    got = fused_tlr_window_(*gpu_state[:3], gpu_state[3], has_previous=True)
    want = fused_tlr_window_(*cpu_state[:3], cpu_state[3], has_previous=True)
    torch.testing.assert_close(got.cpu(), want, rtol=16 * torch.finfo(dtype).eps, atol=0)
    for a, b in zip(gpu_state[2], cpu_state[2]):
        torch.testing.assert_close(a.cpu(), b, rtol=torch.finfo(dtype).eps, atol=0)


def test_a_deep_copied_scheduler_counts_the_steps_of_its_copied_optimizer():
    """copy.deepcopy of a scheduler copies its optimizer; the copy's step tracker must follow
    that copy, so that both runs go on identically."""
    batches = _batches(9)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = hx.TLR(opt, gamma=0.5, update_every=2)
    for batch in batches[:3]:
        _train_step(model, opt, batch)
        sched.step()
    model2, sched2 = copy.deepcopy((model, sched))
    opt2 = sched2.optimizer
    assert opt2 is not opt and opt2.param_groups[0]["params"][0] is next(model2.parameters())
    for batch in batches[3:]:
        _train_step(model, opt, batch)
        sched.step()
        _train_step(model2, opt2, batch)
        sched2.step()
    assert sched2.windows == sched.windows == 4
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
