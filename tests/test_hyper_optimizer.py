"""The hyper-optimizer of the LR learners (hyperlr_ext/optim/_hyper_optimizer.py):
``hyper_optimizer="adam"`` (an Adam step on log eta) and the built-in warm-up ``lr_warmup``.

SGDHD/AdamHD/HyperLR against the float64 oracle are in test_hd_oracle.py and test_hyper_lr.py;
here: MARTHE/RTHO's learned LR against the formula applied to its own hypergradients, the
warm-up against the same run with torch's LambdaLR doing it, the preset's defaults, resuming
from a state_dict bit for bit, a skipped (inf/NaN) step leaving the Adam state alone, and the
arguments' errors.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import hyperlr_ext as hx
from hyperlr_ext import _ops
from hyperlr_ext.optim import ROBUST_PRESET

IMPLS = [
    pytest.param(dict(foreach=False), id="for-loop"),
    pytest.param(dict(foreach=True), id="foreach"),
    pytest.param(
        dict(fused=True),
        id="fused",
        marks=pytest.mark.skipif(not _ops.EXTENSION_AVAILABLE, reason="no compiled extension"),
    ),
]


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(
        dtype
    )


def _batches(n, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(16, 5, generator=gen, dtype=dtype),
            torch.randn(16, 1, generator=gen, dtype=dtype),
        )
        for _ in range(n)
    ]


def _loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _train(model, opt, batches, sched=None):
    for batch in batches:
        if isinstance(opt, hx.MARTHE):
            opt.step(lambda b=batch: _loss(model, b))
        else:
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()
        if sched is not None:
            sched.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _warmup_schedule(opt, steps):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / steps))


LEARNERS = {
    "SGDHD": lambda ps, **kw: hx.SGDHD(ps, lr=0.05, momentum=0.9, **kw),
    "AdamHD": lambda ps, **kw: hx.AdamHD(ps, lr=0.01, **kw),
    "MARTHE": lambda ps, **kw: hx.MARTHE(ps, lr=0.05, momentum=0.9, **kw),
    "RTHO-adam": lambda ps, **kw: hx.RTHO(ps, lr=0.01, inner="adam", **kw),
}
SGD_HYPER_LR = {"SGDHD": 1e-3, "AdamHD": 1e-4, "MARTHE": 1e-4, "RTHO-adam": 1e-5}


@pytest.mark.parametrize("name", list(LEARNERS))
@pytest.mark.parametrize("hyper_optimizer", ["sgd", "adam"])
def test_the_built_in_warm_up_is_a_linear_schedule(name, hyper_optimizer):
    """lr_warmup=W gives the trajectory of lr_warmup=0 with a LambdaLR of factor min(1, (k+1)/W):
    the same scale enters the step and, by the chain rule, the hypergradient."""
    make = LEARNERS[name]
    hyper = dict(hyper_optimizer="adam")
    if hyper_optimizer == "sgd":
        hyper = dict(hyper_lr=SGD_HYPER_LR[name])
    batches = _batches(14)
    ours, theirs = _model(), _model()
    opt = make(ours.parameters(), lr_warmup=6, **hyper)
    ref = make(theirs.parameters(), lr_warmup=0, **hyper)
    _train(ours, opt, batches)
    _train(theirs, ref, batches, _warmup_schedule(ref, 6))
    torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.param_groups[0]["learned_lr"],
                               ref.param_groups[0]["learned_lr"], rtol=1e-12, atol=0)  # fmt: skip
    assert opt.param_groups[0]["warmup_steps_done"] == 6


def test_hyper_lr_warm_up_is_a_linear_schedule():
    batches = _batches(12)
    ours, theirs = _model(), _model()
    opt = torch.optim.AdamW(ours.parameters(), lr=0.01)
    hx.HyperLR(opt, hyper_optimizer="adam", lr_warmup=5)
    ref = torch.optim.AdamW(theirs.parameters(), lr=0.01)
    hx.HyperLR(ref, hyper_optimizer="adam", lr_warmup=0)
    _train(ours, opt, batches)
    _train(theirs, ref, batches, _warmup_schedule(ref, 5))
    torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=1e-12, atol=1e-14)


def _log_lr_adam_formula(eta, hypergrads, alpha, betas, eps, bounds):
    """eta after Adam steps on log eta with the given dE/d eta, in float64 Python."""
    m = v = 0.0
    out = []
    for n, hypergrad in enumerate(hypergrads, start=1):
        q = eta * hypergrad
        m = betas[0] * m + (1 - betas[0]) * q
        v = betas[1] * v + (1 - betas[1]) * q * q
        m_hat, v_hat = m / (1 - betas[0] ** n), v / (1 - betas[1] ** n)
        eta = min(max(eta * math.exp(-alpha * m_hat / (math.sqrt(v_hat) + eps)), bounds[0]),
                  bounds[1])  # fmt: skip
        out.append(eta)
    return out


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_marthe_learned_lr_follows_the_formula_from_its_hypergradients(inner):
    """MARTHE's Delta_t (dE/d eta, tested against unrolled autograd in test_marthe.py) drives
    the Adam step on log eta from the first step that has tangents (the second)."""
    model = _model()
    opt = hx.MARTHE(model.parameters(), lr=0.02, inner=inner, hyper_optimizer="adam",
                    hyper_lr=0.2, lr_warmup=0, lr_bounds=(1e-3, 0.05))  # fmt: skip
    etas, hypergrads = [], []
    for batch in _batches(15):
        opt.step(lambda b=batch: _loss(model, b))
        etas.append(float(opt.param_groups[0]["learned_lr"]))
        hypergrads.append(float(opt.param_groups[0]["hypergrad"]))
    assert etas[0] == 0.02  # no tangent yet: no hypergradient
    expected = _log_lr_adam_formula(0.02, hypergrads[1:], 0.2, (0.9, 0.999), 1e-20, (1e-3, 0.05))
    torch.testing.assert_close(etas[1:], expected, rtol=1e-12, atol=0)
    assert max(etas) > 0.021 or min(etas) < 0.019  # the LR moved


def test_the_preset_fills_every_hyper_argument():
    opt = hx.AdamHD(_model().parameters(), lr=1e-3, hyper_optimizer="adam")
    group = opt.param_groups[0]
    for key, value in ROBUST_PRESET.items():
        assert group[key] == value, key
    assert group["hyper_adam_state"].tolist() == [0.0, 0.0, 1.0, 1.0]
    plain = hx.AdamHD(_model().parameters(), lr=1e-3).param_groups[0]
    assert (plain["hyper_optimizer"], plain["hyper_lr"], plain["lr_warmup"]) == ("sgd", 1e-7, 0)
    assert "hyper_adam_state" not in plain
    assert hx.SGDHD(_model().parameters(), lr=0.1).param_groups[0]["hyper_lr"] == 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda ps, **kw: hx.SGDHD(ps, lr=0.05, momentum=0.9, per_tensor=True, **kw),
                     id="SGDHD-per_tensor"),
        pytest.param(lambda ps, **kw: hx.AdamHD(ps, lr=0.01, lr_lag=1, **kw), id="AdamHD-lag"),
    ],
)  # fmt: skip
def test_resume_is_bit_identical(make, impl):
    """Saved mid-warm-up (step 4 of 10) and loaded into a fresh optimizer: the continued run
    equals the straight one bit for bit (the Adam state and the warm-up count travel)."""
    batches = _batches(12, torch.float32)
    straight = _model(torch.float32)
    straight_opt = make(straight.parameters(), hyper_optimizer="adam", **impl)
    _train(straight, straight_opt, batches)

    model = _model(torch.float32)
    opt = make(model.parameters(), hyper_optimizer="adam", **impl)
    _train(model, opt, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(torch.float32, seed=9)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed.parameters(), hyper_optimizer="adam", **impl)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, batches[4:])
    assert torch.equal(_flat(resumed), _flat(straight))
    for key in ("learned_lr", "hyper_adam_state"):
        assert torch.equal(opt2.param_groups[0][key], straight_opt.param_groups[0][key]), key
    with pytest.raises(ValueError, match="hyper_optimizer"):
        make(_model(torch.float32).parameters()).load_state_dict(saved["opt"])


def test_marthe_resume_is_bit_identical():
    batches = _batches(10)
    straight = _model()
    opt = hx.MARTHE(straight.parameters(), lr=0.02, hyper_optimizer="adam")
    _train(straight, opt, batches)
    model = _model()
    opt = hx.MARTHE(model.parameters(), lr=0.02, hyper_optimizer="adam")
    _train(model, opt, batches[:4])
    state = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed = _model(seed=4)
    resumed.load_state_dict(state[0])
    opt2 = hx.MARTHE(resumed.parameters(), lr=0.02, hyper_optimizer="adam")
    opt2.load_state_dict(state[1])
    _train(resumed, opt2, batches[4:])
    assert torch.equal(_flat(resumed), _flat(straight))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_skipped_step_leaves_the_adam_state(impl):
    model = _model(torch.float32)
    opt = hx.SGDHD(model.parameters(), lr=0.05, momentum=0.9, hyper_optimizer="adam",
                   skip_nonfinite=True, **impl)  # fmt: skip
    _train(model, opt, _batches(3, torch.float32))
    before = {k: opt.param_groups[0][k].clone() for k in ("learned_lr", "hyper_adam_state")}
    weights = _flat(model)
    opt.zero_grad()
    _loss(model, _batches(1, torch.float32)[0]).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.step()
    for key, value in before.items():
        assert torch.equal(opt.param_groups[0][key], value), key
    assert torch.equal(_flat(model), weights)
    assert before["hyper_adam_state"][2] < 1.0  # the state had moved before


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda ps: hx.SGDHD(ps, lr_warmup=-1), "lr_warmup"),
        (lambda ps: hx.SGDHD(ps, lr_warmup=2.5), "lr_warmup"),
        (lambda ps: hx.MARTHE(ps, lr=0.0, hyper_optimizer="adam"), "lr_bounds"),
        (lambda ps: hx.MARTHE(ps, lr=0.01, hyper_optimizer="adam", hyper_hyper_lr=1e-6),
         "hyper_hyper_lr"),
        (lambda ps: hx.HyperLR(torch.optim.SGD(ps, lr=0.1)), "hyper_lr"),
        (lambda ps: hx.HyperLR(torch.optim.SGD(ps, lr=100.0), hyper_optimizer="adam"),
         "lr_bounds"),
        (lambda ps: hx.SGDHD([{"params": ps, "hyper_optimizer": "adam"}], lr=0.1),
         "hyper_optimizer"),
    ],
)  # fmt: skip
def test_invalid_arguments_name_themselves(build, match):
    with pytest.raises(ValueError, match=match):
        build(list(_model().parameters()))
