"""HyperLR (hyperlr_ext/optim/hyper_lr.py): HD over any optimizer by its step hooks.

Around torch.optim.SGD/Adam/AdamW it must follow SGDHD/AdamHD (float64, 1e-10) in exact and lag
mode, additive and multiplicative, per group and per tensor, and the float64 oracle of
tests/oracles/hd.py; around optimizers whose direction is not the gradient's (torch's Adafactor,
a sign-based optimizer written here) it must follow an oracle written from the formula
h_t = <g_hat_t, w_{t-1} - w_t> / eta_{t-1}. Then: schedulers, a tensor LR without host reads,
GradScaler (both ways a scaler skips), state_dict resume, params without gradients, the
arguments' errors, and the low-precision refusal.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from oracles.hd import HDSlotOracle
from sync_guard import NoSync
from test_tlr import _batches, _model

import hyperlr_ext as hx
from hyperlr_ext import _ops

STEPS = 14
PASSES = [
    pytest.param(dict(fused=False, foreach=False), id="single"),
    pytest.param(dict(foreach=True), id="foreach"),
    pytest.param(
        dict(fused=True),
        id="fused",
        marks=pytest.mark.skipif(not _ops.EXTENSION_AVAILABLE, reason="no compiled extension"),
    ),
]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model, opt, batches, sched=None, scaler=None):
    for batch in batches:
        opt.zero_grad()
        loss = _loss(model, batch)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if sched is not None:
            sched.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _groups(model, lrs=(0.05, 0.03)):
    params = list(model.parameters())
    return [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]


SGD_CASES = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(momentum=0.8, dampening=0.3, weight_decay=0.02, maximize=False),
]
ADAM_CASES = [
    ("Adam", dict(), dict()),
    ("Adam", dict(weight_decay=0.05, amsgrad=True), dict(weight_decay=0.05, amsgrad=True)),
    ("AdamW", dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True)),
]
MODES = [
    pytest.param(dict(), id="exact"),
    pytest.param(dict(lr_lag=1), id="lag"),
    pytest.param(dict(multiplicative=True), id="mult"),
    pytest.param(dict(per_tensor=True, lr_lag=1), id="per_tensor-lag"),
    pytest.param(dict(hyper_optimizer="adam", hyper_lr=0.05, lr_bounds=(1e-4, 1.0)), id="log-adam"),
    pytest.param(
        dict(hyper_optimizer="adam", hyper_lr=0.05, per_tensor=True, lr_lag=1),
        id="log-adam-per_tensor-lag",
    ),  # fmt: skip
]


def _hd_kwargs(mode, additive, multiplicative):
    if "hyper_lr" in mode:
        return dict(mode)
    beta = multiplicative if mode.get("multiplicative") else additive
    return dict(hyper_lr=beta, **mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sgd", SGD_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_around_sgd_equals_sgdhd(sgd, mode):
    hd = _hd_kwargs(mode, 2e-2, 0.2)
    batches = _batches(STEPS)
    ours, theirs = _model(), _model()
    opt = torch.optim.SGD(_groups(ours), **sgd)
    hyper = hx.HyperLR(opt, **hd)
    reference = hx.SGDHD(_groups(theirs), **sgd, **hd, foreach=False)
    for batch in batches:
        _train(ours, opt, [batch])
        _train(theirs, reference, [batch])
        for state, group in zip(hyper.groups, reference.param_groups):
            torch.testing.assert_close(state["learned_lr"], group["learned_lr"], rtol=1e-10, atol=0)
            torch.testing.assert_close(state["effective_lr"], group["effective_lr"],
                                       rtol=1e-10, atol=0)  # fmt: skip
    torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=1e-10, atol=1e-12)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.03]  # the scheduled value is back


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda c: c[0] + "-" + "-".join(c[1]))
def test_around_adam_equals_adamhd(case, mode):
    name, torch_kwargs, ours_kwargs = case
    hd = _hd_kwargs(mode, 1e-4, 0.1)
    batches = _batches(STEPS)
    ours, theirs = _model(), _model()
    opt = getattr(torch.optim, name)(_groups(ours, (0.01, 0.02)), **torch_kwargs)
    hyper = hx.HyperLR(opt, **hd)
    reference = hx.AdamHD(_groups(theirs, (0.01, 0.02)), **ours_kwargs, **hd, foreach=False)
    _train(ours, opt, batches)
    _train(theirs, reference, batches)
    torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=1e-10, atol=1e-12)
    for state, group in zip(hyper.groups, reference.param_groups):
        torch.testing.assert_close(state["learned_lr"], group["learned_lr"], rtol=1e-10, atol=0)
        assert not torch.equal(state["learned_lr"], torch.full_like(state["learned_lr"], 0.01))


@pytest.mark.parametrize("implementation", PASSES)
def test_every_pass_follows_the_float64_oracle(implementation):
    """One group; the oracle of tests/oracles/hd.py keeps d_{t-1} explicitly."""
    cfg = dict(momentum=0.9, nesterov=True, weight_decay=0.01)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **cfg)
    hyper = hx.HyperLR(opt, 2e-2, **implementation)
    oracle = HDSlotOracle("sgd", 0.05, hyper_lr=2e-2, **cfg)
    w = _flat(model).clone()
    for batch in _batches(STEPS):
        _train(model, opt, [batch])
        probe = _model()
        torch.nn.utils.vector_to_parameters(w, probe.parameters())
        _loss(probe, batch).backward()
        g = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
        w = oracle.step(w, g, 1.0)
        expected = torch.tensor([oracle.eta, oracle.hypergrad], dtype=torch.float64)
        got = torch.stack([hyper.learned_lr[0], hyper.hypergrad[0]])
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(_flat(model), w, rtol=1e-10, atol=1e-12)


class SignMomentum(torch.optim.Optimizer):
    """A sign-based optimizer (Lion's update): w <- w - lr (sign(b1 m + (1 - b1) g) + wd w),
    m <- b2 m + (1 - b2) g."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                update = (b1 * m + (1 - b1) * p.grad).sign() + group["weight_decay"] * p
                p.sub_(group["lr"] * update)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def _formula_oracle(model, opt, batches, beta, *, lag=False, decay=0.0):
    """HD from the formula, on a copy driven by hand: before each step h = <g_hat, w_prev - w> /
    eta_prev (0 at the first), eta = max(eta + beta h, 0), group["lr"] = eta (or the previous
    eta with lag), then the optimizer's own step. Returns the learned LRs."""
    eta, eta_prev, w_prev, etas = opt.param_groups[0]["lr"], None, None, []
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        w = _flat(model).clone()
        g_hat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) + decay * w
        h = 0.0 if w_prev is None else float(g_hat @ (w_prev - w)) / eta_prev
        new_eta = max(eta + beta * h, 0.0)
        used = eta if lag else new_eta
        eta = new_eta
        opt.param_groups[0]["lr"] = used
        opt.step()
        w_prev, eta_prev = w, used
        etas.append(eta)
    return etas


OTHER_OPTIMIZERS = {
    "adafactor": (lambda p: torch.optim.Adafactor(p, lr=0.01), 1e-5),
    "adafactor-decay": (lambda p: torch.optim.Adafactor(p, lr=0.01, weight_decay=0.1), 1e-5),
    "sign": (lambda p: SignMomentum(p, lr=0.01), 1e-5),
    "sign-decay": (lambda p: SignMomentum(p, lr=0.01, weight_decay=0.1), 1e-5),
}


@pytest.mark.parametrize("lag", [False, True])
@pytest.mark.parametrize("name", list(OTHER_OPTIMIZERS))
def test_other_directions_follow_the_formula(name, lag):
    make, beta = OTHER_OPTIMIZERS[name]
    batches = _batches(20)
    ours, theirs = _model(), _model()
    opt = make(ours.parameters())
    # Both decays here are decoupled (applied to the weights): not part of the objective.
    hyper = hx.HyperLR(opt, beta, lr_lag=int(lag), decoupled_weight_decay=True)
    etas = []
    for batch in batches:
        _train(ours, opt, [batch])
        etas.append(float(hyper.learned_lr[0]))
    expected = _formula_oracle(theirs, make(theirs.parameters()), batches, beta, lag=lag)
    torch.testing.assert_close(torch.tensor(etas), torch.tensor(expected), rtol=1e-10, atol=0)
    torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=1e-10, atol=1e-12)
    assert abs(etas[-1] - 0.01) > 1e-6  # it learned something


def test_a_scheduler_scales_what_is_learned_as_in_sgdhd():
    batches = _batches(STEPS)
    ours, theirs = _model(), _model()
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    hyper = hx.HyperLR(opt, 1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    reference = hx.SGDHD(theirs.parameters(), lr=0.05, hyper_lr=1e-2, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(reference, step_size=3, gamma=0.5)
    _train(ours, opt, batches, sched)
    _train(theirs, reference, batches, ref_sched)
    torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hyper.learned_lr[0], reference.param_groups[0]["learned_lr"],
                               rtol=1e-10, atol=0)  # fmt: skip
    assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0] == 0.05 * 0.5**4


@pytest.mark.parametrize("lag", [0, 1])
def test_a_tensor_lr_is_written_in_place_without_host_reads(lag):
    batches = _batches(6)
    ours, theirs = _model(), _model()
    lr = torch.tensor(0.01, dtype=torch.float64)
    opt = torch.optim.Adam(ours.parameters(), lr=lr, fused=True)
    hyper = hx.HyperLR(opt, 1e-4, lr_lag=lag)
    reference = torch.optim.Adam(theirs.parameters(), lr=0.01, fused=True)
    hx.HyperLR(reference, 1e-4, lr_lag=lag)
    for batch in batches:
        opt.zero_grad()
        _loss(ours, batch).backward()
        with NoSync():
            opt.step()
        _train(theirs, reference, [batch])
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.01
    torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=1e-12, atol=1e-14)
    assert float(hyper.learned_lr[0]) != 0.01


def test_grad_scaler_skips_change_nothing_for_both_kinds_of_optimizer():
    """torch's SGD (the scaler does not call step()) and fused Adam (the scaler hands it
    grad_scale and found_inf): a run with an inf batch equals the run without it."""
    batches = _batches(8)
    bad = (batches[3][0].clone(), batches[3][1].clone())
    bad[1][0, 0] = float("inf")
    for make in (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                 lambda p: torch.optim.Adam(p, lr=0.01, fused=True)):  # fmt: skip
        runs = []
        for data in (batches, batches[:4] + [bad] + batches[4:]):
            model = _model()
            opt = make(model.parameters())
            hyper = hx.HyperLR(opt, 1e-4)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
            _train(model, opt, data, scaler=scaler)
            runs.append((_flat(model), hyper.learned_lr[0].clone(), scaler.get_scale()))
        (w0, eta0, _), (w1, eta1, scale1) = runs
        assert scale1 == 2.0**7  # the scaler saw the inf
        torch.testing.assert_close(w1, w0, rtol=0, atol=0)
        torch.testing.assert_close(eta1, eta0, rtol=0, atol=0)


@pytest.mark.parametrize(
    "mode",
    [dict(), dict(lr_lag=1, per_tensor=True), dict(hyper_optimizer="adam", lr_bounds=(1e-4, 1.0))],
    ids=["exact", "lag", "log-adam"],
)
def test_state_dict_resumes_bit_identically_and_loads_weights_only(mode):
    batches = _batches(10)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    hyper = hx.HyperLR(opt, 1e-4, **mode)
    _train(model, opt, batches)
    straight = _flat(model)

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    hyper = hx.HyperLR(opt, 1e-4, **mode)
    _train(model, opt, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hyper": hyper.state_dict()},
               buffer)  # fmt: skip
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=0.01)
    opt2.load_state_dict(saved["opt"])
    hyper2 = hx.HyperLR(opt2, 1e-4, **mode)
    hyper2.load_state_dict(saved["hyper"])
    _train(resumed, opt2, batches[5:])
    assert torch.equal(_flat(resumed), straight)
    with pytest.raises(ValueError, match="saved with"):
        hx.HyperLR(torch.optim.AdamW(_model().parameters(), lr=0.01), 1e-3).load_state_dict(
            saved["hyper"]
        )


def test_the_optimizer_state_dict_carries_the_wrapper_state():
    """Checkpoints that save only the optimizer (Trainer, Lightning) resume the learned LR."""
    batches = _batches(8)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hx.HyperLR(opt, 1e-2)
    _train(model, opt, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, batches[4:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(seed=3)
    resumed.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    hyper2 = hx.HyperLR(opt2, 1e-2)
    opt2.load_state_dict(saved["opt"])
    assert float(hyper2.learned_lr[0]) != 0.05
    _train(resumed, opt2, batches[4:])
    assert torch.equal(_flat(resumed), _flat(model))
    plain = torch.optim.SGD(_model().parameters(), lr=0.05, momentum=0.9)
    plain.load_state_dict(saved["opt"])  # an optimizer without the wrapper ignores its state


def test_a_closure_is_wrapped_so_the_pass_sees_its_gradients():
    """step(closure) as Lightning calls it: zero_grad, forward and backward inside the closure."""
    batches = _batches(6)
    ours, theirs = _model(), _model()
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    hx.HyperLR(opt, 1e-2)
    reference = hx.SGDHD(theirs.parameters(), lr=0.05, hyper_lr=1e-2, momentum=0.9)
    for batch in batches:
        for model, o in ((ours, opt), (theirs, reference)):

            def closure(model=model, o=o):
                o.zero_grad()
                loss = _loss(model, batch)
                loss.backward()
                return loss

            o.step(closure=closure) if batch is batches[0] else o.step(closure)
    torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=1e-10, atol=1e-12)


def test_params_without_gradients_count_as_not_moved_as_in_sgdhd():
    batches = _batches(8)
    ours, theirs = _model(), _model()
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    hx.HyperLR(opt, 1e-2)
    reference = hx.SGDHD(theirs.parameters(), lr=0.05, hyper_lr=1e-2, momentum=0.9, foreach=False)
    for t, batch in enumerate(batches):
        for model, o in ((ours, opt), (theirs, reference)):
            o.zero_grad()
            _loss(model, batch).backward()
            if t % 3 == 1:
                model[2].bias.grad = None  # not stepped this time
            o.step()
    torch.testing.assert_close(_flat(ours), _flat(theirs), rtol=1e-10, atol=1e-12)


def test_remove_detaches_and_a_second_wrapper_is_refused():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hyper = hx.HyperLR(opt, 1e-2)
    with pytest.raises(ValueError, match="already has a HyperLR"):
        hx.HyperLR(opt, 1e-2)
    assert hx.HyperLR.attached(opt) is hyper
    hyper.remove()
    assert hx.HyperLR.attached(opt) is None
    _train(model, opt, _batches(3))
    assert float(hyper.learned_lr[0]) == 0.05 and opt.param_groups[0]["lr"] == 0.05
    hx.HyperLR(opt, 1e-2)  # attaches again


def test_invalid_arguments_name_themselves():
    opt = torch.optim.SGD(_model().parameters(), lr=0.05)
    with pytest.raises(ValueError, match="hyper_lr"):
        hx.HyperLR(opt, -1.0)
    with pytest.raises(ValueError, match="lr_lag"):
        hx.HyperLR(opt, 1e-3, lr_lag=2)
    with pytest.raises(ValueError, match="per_tensor"):
        hx.HyperLR(opt, 1e-3, per_tensor=1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        hx.HyperLR(object(), 1e-3)
    with pytest.raises(ValueError, match="learns its LR itself"):
        hx.HyperLR(hx.SGDHD(_model().parameters(), lr=0.05), 1e-3)
    with pytest.raises(ValueError, match="must be > 0"):
        hx.HyperLR(torch.optim.SGD(_model().parameters(), lr=0.0), 1e-3)
    with pytest.raises(ValueError, match="decoupled_weight_decay=True or False"):
        hx.HyperLR(SignMomentum(_model().parameters(), weight_decay=0.1), 1e-3)


def test_low_precision_weights_are_refused_unless_allowed():
    model = _model().to(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 parameters"):
        hx.HyperLR(torch.optim.SGD(model.parameters(), lr=0.05), 1e-3)
    with pytest.warns(UserWarning, match="coarse"):
        hx.HyperLR(torch.optim.SGD(model.parameters(), lr=0.05), 1e-3, allow_low_precision=True)


def test_a_step_that_raises_leaves_the_scheduled_lr():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hx.HyperLR(opt, 1e-2)
    _train(model, opt, _batches(2))

    def failing(optimizer, args, kwargs):
        raise RuntimeError("boom")

    handle = opt.register_step_post_hook(failing)
    opt.zero_grad()
    _loss(model, _batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    handle.remove()
    _train(model, opt, _batches(1))
    assert opt.param_groups[0]["lr"] == 0.05


def test_a_deepcopy_of_the_optimizer_has_no_wrapper_until_given_one():
    """torch.optim's copies keep no step hooks; a copy wrapped again follows the original."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hyper = hx.HyperLR(opt, 1e-2)
    _train(model, opt, _batches(3))
    model2, opt2 = copy.deepcopy((model, opt))
    assert hx.HyperLR.attached(opt2) is None
    hyper2 = hx.HyperLR(opt2, 1e-2)
    hyper2.load_state_dict(hyper.state_dict())
    _train(model, opt, _batches(2, seed=4))
    _train(model2, opt2, _batches(2, seed=4))
    assert torch.equal(_flat(model), _flat(model2))
    assert torch.equal(hyper.learned_lr[0], hyper2.learned_lr[0])
