"""MARTHE / RTHO with amortised Hessian products (``hvp_every``, ``hvp_closure``,
``hvp="forward_difference"``) against exact references, float64:

- ``hvp_every=k`` propagates the tangent without the loss-Hessian term on the steps it skips:
  Delta_T equals autograd's dE(w_T)/d eta through the unrolled trajectory in which the loss
  gradient of those steps is held constant in w (``detach``), the same trajectory otherwise;
- ``hvp_closure`` (a subsample of the batch) takes the Hessian of the subsample's loss: Delta_T
  equals autograd's through the trajectory whose loss gradients have the subsample's derivative;
- the forward difference against the exact Delta_T;
- the error of each against the exact hypergradient, step by step (the accuracy they trade);
- the cost: no double-backward graph on the steps without a product; resume; errors.
"""

from __future__ import annotations

import pytest
import torch
from test_marthe import (
    CONFIGS,
    _batches,
    _graph_grads,
    _impl,
    _loss,
    _lr,
    _model,
    _unrolled_hypergrad,
)

import hyperlr_ext as hx
from hyperlr_ext.optim import marthe as marthe_module

STEPS = 20  # as test_marthe: the 21st step computes Delta_20


def _constant_grads(model, w, batch):
    """The loss gradient at w, as a constant (no derivative in w)."""
    frozen = [x.detach().requires_grad_(True) for x in w]
    return torch.autograd.grad(_loss(model, frozen, batch), frozen)


def _cut_every(k):
    """Step t's loss gradient keeps its Hessian only where MARTHE forms the product: on the
    tangents' steps 0, k, 2k, ... (step t >= 1 is the tangents' step t - 1; step 0 has Z = 0)."""

    def grads(model, w, batch, t):
        if t >= 1 and (t - 1) % k == 0:
            return _graph_grads(model, w, batch, t)
        return _constant_grads(model, w, batch)

    return grads


def _subsample(batch, n=4):
    x, y = batch
    return x[:n], y[:n]


def _subsample_hessian(model, w, batch, t):
    """The batch's gradient in value, the subsample's Hessian in derivative."""
    sub = _subsample(batch)
    graph = _graph_grads(model, w, sub, t)
    constant = _constant_grads(model, w, sub)
    full = _constant_grads(model, w, batch)
    return [f + (g - c) for f, g, c in zip(full, graph, constant)]


def _run(opt, model, batches, subsample=False):
    """Steps ``opt`` over ``batches``; the hypergradient Delta_t of every step."""
    deltas = []
    for batch in batches:
        params = list(model.parameters())
        closure = lambda b=batch: _loss(model, params, b)  # noqa: E731
        hvp_closure = None
        if subsample:
            hvp_closure = lambda b=batch: _loss(model, params, _subsample(b))  # noqa: E731
        opt.step(closure, hvp_closure=hvp_closure)
        deltas.append(opt.param_groups[0]["hypergrad"].clone())
    return deltas


def _rtho(model, name, **kwargs):
    return hx.RTHO(model.parameters(), lr=_lr(name), hyper_lr=0.0, **CONFIGS[name], **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("fused", [False, "foreach", None])
def test_hvp_every_is_the_trajectory_with_constant_gradients_between_products(name, k, fused):
    model, batches = _model(), _batches(STEPS + 1)
    expected = _unrolled_hypergrad(model, batches, _lr(name), CONFIGS[name], grads=_cut_every(k))
    got = _run(_rtho(model, name, hvp_every=k, **_impl(fused)), model, batches)[-1]
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=0.0)
    assert expected.abs() > 1e-6


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("hvp", ["autograd", "finite_difference", "forward_difference"])
def test_hvp_closure_takes_the_subsample_hessian(name, hvp):
    model, batches = _model(), _batches(STEPS + 1)
    expected = _unrolled_hypergrad(model, batches, _lr(name), CONFIGS[name],
                                   grads=_subsample_hessian)  # fmt: skip
    got = _run(_rtho(model, name, hvp=hvp), model, batches, subsample=True)[-1]
    rtol = {"autograd": 1e-8, "finite_difference": 1e-5, "forward_difference": 1e-3}[hvp]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0.0)


def test_hvp_every_and_hvp_closure_combine():
    def grads(model, w, batch, t):
        if t >= 1 and (t - 1) % 3 == 0:
            return _subsample_hessian(model, w, batch, t)
        return _constant_grads(model, w, batch)

    model, batches = _model(), _batches(STEPS + 1)
    expected = _unrolled_hypergrad(model, batches, _lr("momentum"), CONFIGS["momentum"],
                                   grads=grads)  # fmt: skip
    got = _run(_rtho(model, "momentum", hvp_every=3), model, batches, subsample=True)[-1]
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_difference_is_close_to_the_exact_hypergradient(name):
    model, batches = _model(), _batches(STEPS + 1)
    expected = _unrolled_hypergrad(model, batches, _lr(name), CONFIGS[name])
    got = _run(_rtho(model, name, hvp="forward_difference"), model, batches)[-1]
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=0.0)


def _errors(name, subsample=False, **kwargs):
    """Delta_t - exact_t and exact_t for t = 2..STEPS, the exact one by autograd through the
    unrolled trajectory of each length (beta = 0: the same weights for every setting)."""
    model, batches = _model(), _batches(STEPS + 1)
    got = _run(_rtho(model, name, **kwargs), model, batches, subsample=subsample)
    out = []
    for t in range(2, STEPS + 1):
        exact = _unrolled_hypergrad(_model(), batches[: t + 1], _lr(name), CONFIGS[name])
        out.append((float(got[t] - exact), float(exact)))
    return out


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam"])
def test_amortised_hypergradients_keep_sign_and_scale(name):
    """The accuracy traded for cost, step by step against the exact Delta_t. k = 1 is exact.
    For k = 2, 4, 8 and the half-batch product this model measures median relative errors of
    0.04-0.53, the sign right on 84-100% of steps, and no error above 1.8x the exact Delta's RMS
    over the run (the relative error of a single step can be large where the exact Delta
    crosses 0); the bounds leave a margin over those figures."""
    exact = _errors(name)
    assert max(abs(d) / abs(e) for d, e in exact) < 1e-8
    for kwargs in (dict(hvp_every=2), dict(hvp_every=4), dict(hvp_every=8),
                   dict(subsample=True)):  # fmt: skip
        errors = _errors(name, **kwargs)
        relative = sorted(abs(d) / abs(e) for d, e in errors)
        rms = (sum(e * e for _, e in errors) / len(errors)) ** 0.5
        same_sign = sum((d + e > 0) == (e > 0) for d, e in errors) / len(errors)
        assert relative[len(relative) // 2] < 0.6, (kwargs, relative)
        assert same_sign >= 0.8, (kwargs, same_sign)
        assert max(abs(d) for d, _ in errors) < 2.5 * rms, kwargs


def test_skipped_products_build_no_double_backward_graph(monkeypatch):
    """The cost saved: the closure's gradient is taken with a graph only on product steps."""
    graphs = []
    original = marthe_module.loss_grads

    def recording(*args, graph, **kwargs):
        graphs.append(graph)
        return original(*args, graph=graph, **kwargs)

    monkeypatch.setattr(marthe_module, "loss_grads", recording)
    model = _model()
    _run(_rtho(model, "momentum", hvp_every=3), model, _batches(8))
    assert graphs == [False, True, False, False, True, False, False, True]


def test_hvp_every_resumes_bit_identically_mid_cycle():
    batches = _batches(10)
    model = _model()
    straight = _rtho(model, "nesterov", hvp_every=4)
    _run(straight, model, batches)
    resumed_model = _model()
    first = _rtho(resumed_model, "nesterov", hvp_every=4)
    _run(first, resumed_model, batches[:6])  # tangents' step 4 of 5: mid-cycle
    state = first.state_dict()
    second = _rtho(resumed_model, "nesterov", hvp_every=4)
    second.load_state_dict(state)
    _run(second, resumed_model, batches[6:])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(straight.param_groups[0]["hypergrad"], second.param_groups[0]["hypergrad"])


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_hvp_every_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="hvp_every must be an integer >= 1"):
        hx.MARTHE(_model().parameters(), hvp_every=value)


def test_hvp_names_every_kind():
    with pytest.raises(ValueError, match="forward_difference"):
        hx.MARTHE(_model().parameters(), hvp="backward")
