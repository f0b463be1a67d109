"""torch.compile: a compiled optimizer step gives the eager result (float64) and
torch._dynamo.explain finds no graph break caused by our code. The fused ops reach the compiler
through their registered schemas (fake kernels in hyperlr_ext/_ops.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import hyperlr_ext as hx

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
HD = {
    "SGDHD-default": lambda p: hx.SGDHD(p, lr=0.05, hyper_lr=1e-3, momentum=0.9),
    "SGDHD-foreach": lambda p: hx.SGDHD(p, lr=0.05, hyper_lr=1e-3, nesterov=True, momentum=0.9,
                                        foreach=True),
    "SGDHD-loop-lag": lambda p: hx.SGDHD(p, lr=0.05, hyper_lr=1e-3, lr_lag=1, foreach=False),
    "AdamHD-default": lambda p: hx.AdamHD(p, lr=1e-2, hyper_lr=1e-5),
    "AdamHD-foreach-mult": lambda p: hx.AdamHD(p, lr=1e-2, hyper_lr=1e-2, multiplicative=True,
                                               foreach=True),
}  # fmt: skip


def _base():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    ).double()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(HD))
def test_compiled_hd_step_matches_eager_without_graph_breaks(name):
    base = _base()
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    eager, compiled = HD[name](eager_model.parameters()), HD[name](compiled_model.parameters())
    compiled_step = torch.compile(compiled.step)
    for t in range(4):
        for model, opt, step in ((eager_model, eager, eager.step),
                                 (compiled_model, compiled, compiled_step)):  # fmt: skip
            opt.zero_grad()
            model(X * (t + 1)).pow(2).mean().backward()
            step()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        compiled.param_groups[0]["learned_lr"], eager.param_groups[0]["learned_lr"],
        rtol=1e-12, atol=0,
    )  # fmt: skip
    explanation = torch._dynamo.explain(compiled.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_compiled_marthe_step_matches_eager_and_breaks_only_at_autograd(inner):
    kwargs = dict(lr=0.05, hyper_lr=1e-3, momentum=0.9) if inner == "sgd" else dict(
        lr=1e-2, hyper_lr=1e-4, inner="adam")  # fmt: skip
    base = _base()
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    opts = [hx.MARTHE(m.parameters(), **kwargs) for m in models]
    steps = [opts[0].step, torch.compile(opts[1].step)]
    for t in range(4):
        for model, step in zip(models, steps):
            step(lambda model=model, t=t: model(X * (t + 1)).pow(2).mean())
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
    explanation = torch._dynamo.explain(opts[1].step)(lambda: models[1](X).pow(2).mean())
    reasons = [str(b.reason) for b in explanation.break_reasons]
    # The training gradient and the Hessian-vector product are autograd's work (like backward()
    # in a compiled training step), kept out of the graph on purpose: torch.compile cannot
    # double-backward through a compiled forward. Nothing else breaks the graph.
    autograd_parts = ("loss_grads", "hvp_autograd", "torch.autograd.grad")
    assert all(any(part in r for part in autograd_parts) for r in reasons), reasons
    assert explanation.graph_break_count <= 2


def test_tlr_with_a_tensor_lr_compiles_without_graph_breaks():
    model = _base()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05, dtype=torch.float64))
    sched = hx.TLR(opt, update_every=1)
    for _ in range(2):
        opt.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()
        sched.step()
    opt.step()  # a step for the explained sched.step() to count (it ignores steps that did not run)
    explanation = torch._dynamo.explain(sched.step)()
    assert explanation.graph_count >= 1
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_hyper_lr_around_a_compiled_torch_step_matches_eager():
    """The hooks run with the compiled step (dynamo traces them with it); the trajectory is the
    eager one. A tensor LR, as torch recommends for compiled optimizers: a float LR that changes
    every step recompiles the step every step."""
    base = _base()
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    opts = []
    for model in models:
        lr = torch.tensor(0.05, dtype=torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        hx.HyperLR(opt, 1e-3)
        opts.append(opt)
    steps = [opts[0].step, torch.compile(opts[1].step)]
    for t in range(4):
        for model, opt, step in zip(models, opts, steps):
            opt.zero_grad()
            model(X * (t + 1)).pow(2).mean().backward()
            step()
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
    learned = [hx.HyperLR.attached(o).learned_lr[0] for o in opts]
    torch.testing.assert_close(learned[1], learned[0], rtol=1e-12, atol=0)
    assert float(learned[0]) != 0.05
