"""MLR-SNet (hyperlr_ext/schedulers/mlr_snet.py): the meta-hypergradient against autograd's
dL_val(w - LR d)/dLR through the step that ran (float64), the net's gradient against the scalar
chain rule, the LR inside (0, gamma), frozen meta-test, lossless state_dict (LSTM state and
meta-optimizer included, weights_only loading), the shipped nets, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import hyperlr_ext as hx
from hyperlr_ext.schedulers.mlr_snet import MLRSNetModule


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    ).double()


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 4, generator=gen, dtype=torch.float64),
         torch.randn(8, 1, generator=gen, dtype=torch.float64))
        for _ in range(n)
    ]  # fmt: skip


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def test_meta_hypergradient_is_autograds_and_the_net_gets_the_chain_rule():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # d is not the gradient
    torch.manual_seed(3)
    sched = hx.MLRSNet(opt, gamma=0.5, meta_every=2, meta_lr=1e-3)
    batches, val = _batches(8), _batches(1, seed=7)[0]
    checked = 0
    for t, batch in enumerate(batches, start=1):
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        applied = opt.param_groups[0]["lr"]
        opt.step()
        directions = [(b - p.detach()) / applied for b, p in zip(before, model.parameters())]
        net_before = copy.deepcopy(sched.net)
        last_input, last_state = sched.last_input, sched.last_state
        sched.step(loss, val_closure=lambda: _loss(model, val))
        if t % 2:
            continue
        # dL_val(w - LR d)/dLR at LR = the applied LR, by autograd through the step.
        lr = torch.tensor(applied, dtype=torch.float64, requires_grad=True)
        shifted = [b - lr * d for b, d in zip(before, directions)]
        names = [n for n, _ in model.named_parameters()]
        out = torch.func.functional_call(model, dict(zip(names, shifted)), (val[0],))
        expected = torch.autograd.grad(torch.nn.functional.mse_loss(out, val[1]), lr)[0]
        torch.testing.assert_close(sched.last_hypergrad, expected, rtol=1e-9, atol=0)
        # The net's gradient: hypergrad * d(gamma p)/dtheta through the forward that gave LR.
        p = net_before(last_input, tuple(last_state))[0]
        want = torch.autograd.grad(0.5 * p, list(net_before.parameters()))
        for g, w in zip((q.grad for q in sched.net.parameters()), want):
            torch.testing.assert_close(g, w * expected.float(), rtol=1e-5, atol=1e-12)
        checked += 1
    assert checked == 4 and float(sched.last_hypergrad) != 0


def test_lr_stays_strictly_inside_zero_gamma():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = hx.MLRSNet(opt, gamma=2.0, meta_every=1, meta_lr=0.5)  # large meta steps
    val = _batches(1, seed=7)[0]
    for loss in (0.0, 1e-9, 1.0, 1e6, 1e30, 3.0):
        opt.zero_grad()
        _loss(model, val).backward()
        opt.step()
        sched.step(torch.tensor(loss), val_closure=lambda: _loss(model, val))
        lr = opt.param_groups[0]["lr"]
        assert 0.0 < lr < 2.0


def test_first_lr_comes_from_the_net():
    opt = torch.optim.SGD(_model().parameters(), lr=123.0)
    torch.manual_seed(0)
    net = MLRSNetModule(8)
    sched = hx.MLRSNet(opt, gamma=0.3, net=net)
    expected = 0.3 * torch.sigmoid(net.head.bias.detach()).item()
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]


def test_forget_gate_bias_starts_at_minus_one():
    net = MLRSNetModule(5)
    bias = net.input_to_gates[2].bias + net.state_to_gates[2].bias
    assert torch.equal(bias[5:10].detach(), torch.full((5,), -1.0))


def _run(model, opt, sched, batches, val):
    for batch in batches:
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        sched.step(loss, val_closure=lambda: _loss(model, val))


def test_frozen_net_does_not_change():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = hx.MLRSNet(opt, meta_every=1, train=False)
    before = copy.deepcopy(sched.net.state_dict())
    _run(model, opt, sched, _batches(5), _batches(1, seed=7)[0])
    assert all(torch.equal(before[k], v) for k, v in sched.net.state_dict().items())
    assert sched.snapshot is None  # no weight copy is kept when not meta-training


def test_state_dict_round_trip_is_bit_identical():
    batches, val = _batches(14), _batches(1, seed=7)[0]
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    sched = hx.MLRSNet(opt, meta_every=3, meta_lr=1e-2, hidden_size=12)
    _run(model, opt, sched, batches[:7], val)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buffer)  # fmt: skip
    _run(model, opt, sched, batches[7:], val)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = _model(seed=4)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(9)
    sched2 = hx.MLRSNet(opt2, meta_every=3, meta_lr=1e-2, hidden_size=12)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    _run(model2, opt2, sched2, batches[7:], val)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    for a, b in zip(sched.net.parameters(), sched2.net.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(sched.lstm_state, sched2.lstm_state))
    other = hx.MLRSNet(torch.optim.SGD(_model().parameters(), lr=0.1), hidden_size=7)
    with pytest.raises(ValueError, match="hidden size"):
        other.load_state_dict(saved["sched"])


def test_tensor_lr_is_set_in_place():
    model = _model()
    lr = torch.tensor(0.1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = hx.MLRSNet(opt, gamma=0.5, meta_every=2)
    _run(model, opt, sched, _batches(4), _batches(1, seed=7)[0])
    assert opt.param_groups[0]["lr"] is lr and 0 < float(lr) < 0.5


def test_errors():
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    for kwargs, match in (
        (dict(gamma=0.0), "gamma"),
        (dict(meta_every=0), "meta_every"),
        (dict(meta_lr=-1.0), "meta_lr"),
        (dict(hidden_size=0), "hidden_size"),
    ):
        with pytest.raises(ValueError, match=match):
            hx.MLRSNet(opt, **kwargs)
    with pytest.raises(TypeError, match="MLRSNetModule"):
        hx.MLRSNet(opt, net=torch.nn.Linear(1, 1))
    sched = hx.MLRSNet(opt)
    with pytest.raises(ValueError, match="training loss"):
        sched.step()
    with pytest.raises(ValueError, match="scalar"):
        sched.step(torch.ones(3))
    with pytest.raises(ValueError, match="no pretrained MLR-SNet named"):
        hx.MLRSNet.from_pretrained(opt, "no-such-net")


@pytest.mark.parametrize("name", hx.MLRSNet.pretrained_names())
def test_pretrained_nets_load_offline_and_drive_training(name):
    """A shipped net, frozen, schedules SGD on a learnable regression (a linear teacher): the LR
    stays inside (0, gamma) and the training loss falls."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = hx.MLRSNet.from_pretrained(opt, name)
    assert not sched.train and sched.gamma > 0
    teacher = torch.randn(4, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batches = [(x, x @ teacher) for x, _ in _batches(10)]

    def mean_loss():
        with torch.no_grad():
            return sum(float(_loss(model, b)) for b in batches) / len(batches)

    first = mean_loss()
    for batch in batches * 5:
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        sched.step(loss)
        assert 0 < opt.param_groups[0]["lr"] < sched.gamma
    assert mean_loss() < 0.5 * first


def test_multi_phase_switches_nets_at_the_boundaries():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    nets = [MLRSNetModule(6) for _ in range(3)]
    sched = hx.MLRSNet.multi_phase(opt, nets, boundaries=[2, 4], gamma=0.5)
    val = _batches(1, seed=7)[0]
    expected = 0.5 * torch.sigmoid(nets[0].head.bias.detach()).item()
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)
    seen = []
    for step, batch in enumerate(_batches(6), start=1):
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        sched.step(loss, val_closure=lambda: _loss(model, val))  # frozen: no meta-training
        phase = 0 if step < 2 else (1 if step < 4 else 2)
        seen.append(phase)
        for a, b in zip(sched.net.parameters(), nets[phase].parameters()):
            assert torch.equal(a.detach(), b.detach())
    assert seen == [0, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="boundaries"):
        hx.MLRSNet.multi_phase(opt, nets, boundaries=[3])
    named = hx.MLRSNet.multi_phase(opt, ["mnist-mlp", "digits-mlp"], boundaries=[10])
    assert not named.train and len(named.phases) == 1


def test_non_finite_losses_leave_the_lr_and_the_lstm_unchanged():
    """A NaN or inf training loss (a diverging or AMP-skipped step) changes neither the LR nor
    the LSTM state; a NaN validation loss takes no meta step; training then goes on."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = hx.MLRSNet(opt, meta_every=1, meta_lr=1e-2)
    val = _batches(1, seed=7)[0]
    _run(model, opt, sched, _batches(3), val)
    for bad in (float("nan"), float("inf")):
        lr, state = opt.param_groups[0]["lr"], [t.clone() for t in sched.lstm_state]
        weights = copy.deepcopy(sched.net.state_dict())
        sched.step(torch.tensor(bad), val_closure=lambda: _loss(model, val) * float("nan"))
        assert opt.param_groups[0]["lr"] == lr
        assert all(torch.equal(a, b) for a, b in zip(state, sched.lstm_state))
        assert all(torch.equal(weights[k], v) for k, v in sched.net.state_dict().items())
    _run(model, opt, sched, _batches(3, seed=5), val)
    assert 0 < opt.param_groups[0]["lr"] < 1.0
