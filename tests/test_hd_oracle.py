"""SGDHD / AdamHD against the independent oracle (tests/oracles/hd.py), step by step, float64.

A multi-tensor MLP in two param groups (different lr); the package updates one copy of the model,
the oracle another; both see the same batches. Every step, each LR slot's applied LR and
hypergradient must match, and at the end the weights.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from oracles.hd import HDSlotOracle

import hyperlr_ext as hx
from hyperlr_ext import _ops

SGD_CONFIGS = [
    dict(hyper_lr=0.02),
    dict(hyper_lr=0.02, weight_decay=0.05),
    dict(hyper_lr=0.02, momentum=0.9),
    dict(hyper_lr=0.02, momentum=0.8, dampening=0.3, weight_decay=0.01),
    dict(hyper_lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(hyper_lr=0.2, multiplicative=True),
    dict(hyper_lr=0.2, multiplicative=True, momentum=0.9, nesterov=True),
    dict(hyper_lr=0.01, momentum=0.5, maximize=True),
]
ADAM_CONFIGS = [
    dict(hyper_lr=1e-3),
    dict(hyper_lr=1e-3, weight_decay=0.05),
    dict(hyper_lr=1e-3, weight_decay=0.05, decoupled_weight_decay=True),
    dict(hyper_lr=1e-3, amsgrad=True, betas=(0.8, 0.99)),
    dict(hyper_lr=0.2, multiplicative=True),
    dict(hyper_lr=0.2, multiplicative=True, weight_decay=0.1, decoupled_weight_decay=True),
    dict(hyper_lr=1e-4, maximize=True, eps=1e-6),
]
# hyper_optimizer="adam": the Adam step on log eta, with its settings written out (the oracle
# takes them from here, not from the package's preset; its warm-up is tested in
# test_hyper_optimizer.py); the last of each kind hits lr_bounds.
LOG_ADAM = dict(hyper_optimizer="adam", hyper_betas=(0.9, 0.999), hyper_eps=1e-20, lr_warmup=0,
                lr_bounds=(1e-4, 1.0))  # fmt: skip
LOG_ADAM_CASES = [
    ("sgd", dict(LOG_ADAM, hyper_lr=0.05)),
    ("sgd", dict(LOG_ADAM, hyper_lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", dict(LOG_ADAM, hyper_lr=0.5, momentum=0.9, lr_bounds=(0.04, 0.12))),
    ("adam", dict(LOG_ADAM, hyper_lr=0.05)),
    ("adam", dict(LOG_ADAM, hyper_lr=0.05, weight_decay=0.05, decoupled_weight_decay=True)),
    ("adam", dict(LOG_ADAM, hyper_lr=0.5, amsgrad=True, lr_bounds=(0.008, 0.025))),
]
CASES = [("sgd", c) for c in SGD_CONFIGS] + [("adam", c) for c in ADAM_CONFIGS] + LOG_ADAM_CASES
LR = {"sgd": 0.05, "adam": 0.01}
STEPS = 12


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 3),
        torch.nn.Tanh(),
        torch.nn.Linear(3, 1),
    ).double()


def _groups(model):
    params = list(model.parameters())
    return [params[:2], params[2:]]


def _loss(model, x, y):
    return (model(x) - y).pow(2).mean()


def _run(kind, cfg, *, per_tensor, lr_lag, validation, schedule, foreach, fused=None):
    model, shadow = _model(), _model()
    groups = _groups(model)
    base_lrs = [LR[kind], 2 * LR[kind]]
    cls = hx.SGDHD if kind == "sgd" else hx.AdamHD
    opt = cls(
        [{"params": groups[0]}, {"params": groups[1], "lr": base_lrs[1]}],
        lr=base_lrs[0],
        per_tensor=per_tensor,
        lr_lag=lr_lag,
        foreach=foreach,
        fused=fused,
        **cfg,
    )
    shadow_groups = _groups(shadow)
    slots = []  # (group index, [shadow tensors], oracle)
    for gi, tensors in enumerate(shadow_groups):
        parts = [[t] for t in tensors] if per_tensor else [tensors]
        for part in parts:
            slots.append((gi, part, HDSlotOracle(kind, base_lrs[gi], lr_lag=lr_lag, **cfg)))

    gen = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(16, 1, generator=gen, dtype=torch.float64)
        xv = torch.randn(16, 6, generator=gen, dtype=torch.float64)
        yv = torch.randn(16, 1, generator=gen, dtype=torch.float64)
        factor = 1.0 if not schedule else [1.0, 0.5, 0.25, 0.0, 1.0, 0.7][t % 6]
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * factor

        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step(val_closure=(lambda: _loss(model, xv, yv)) if validation else None)

        shadow.zero_grad()
        _loss(shadow, x, y).backward()
        val_grads = None
        if validation:
            val_grads = torch.autograd.grad(_loss(shadow, xv, yv), list(shadow.parameters()))
            val_grads = dict(zip(shadow.parameters(), val_grads))
        with torch.no_grad():
            for _, tensors, oracle in slots:
                w = torch.cat([p.reshape(-1) for p in tensors])
                g = torch.cat([p.grad.reshape(-1) for p in tensors])
                vg = torch.cat([val_grads[p].reshape(-1) for p in tensors]) if validation else None
                new = oracle.step(w, g, factor, vg)
                offset = 0
                for p in tensors:
                    p.copy_(new[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()

        applied = [e for g in opt.param_groups for e in g["effective_lr"].reshape(-1).tolist()]
        hypergrads = [h for g in opt.param_groups for h in g["hypergrad"].reshape(-1).tolist()]
        expected_applied = [o.applied for _, _, o in slots]
        expected_hg = [o.hypergrad for _, _, o in slots]
        torch.testing.assert_close(applied, expected_applied, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(hypergrads, expected_hg, rtol=1e-9, atol=1e-13)

    for p, q in zip(model.parameters(), shadow.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # The comparison is only meaningful if HD moved the LR.
    learned = [o.eta for _, _, o in slots]
    initial = [base_lrs[gi] for gi, _, _ in slots]
    assert any(abs(a - b) > 1e-4 * b for a, b in zip(learned, initial))


@pytest.mark.parametrize("kind,cfg", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
@pytest.mark.parametrize("per_tensor,lr_lag", list(itertools.product([False, True], [0, 1])))
def test_matches_oracle(kind, cfg, per_tensor, lr_lag):
    _run(
        kind,
        cfg,
        per_tensor=per_tensor,
        lr_lag=lr_lag,
        validation=False,
        schedule=False,
        foreach=None,
    )


@pytest.mark.parametrize(
    "kind,cfg", [CASES[2], CASES[4], CASES[9], CASES[10], CASES[12], *LOG_ADAM_CASES[1::3]]
)
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_oracle_with_validation_and_schedule(kind, cfg, foreach):
    """First-order (Val) with a scheduler writing group["lr"] (including a step at lr = 0)."""
    _run(kind, cfg, per_tensor=False, lr_lag=0, validation=True, schedule=True, foreach=foreach)


@pytest.mark.skipif(not _ops.EXTENSION_AVAILABLE, reason="compiled extension unavailable")
@pytest.mark.parametrize("kind,cfg", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
@pytest.mark.parametrize("per_tensor,lr_lag", list(itertools.product([False, True], [0, 1])))
@pytest.mark.parametrize("validation", [False, True])
def test_fused_matches_oracle(kind, cfg, per_tensor, lr_lag, validation):
    """The fused kernels (SGDHD/AdamHD(fused=True)) against the same oracle, with a scheduler."""
    _run(
        kind,
        cfg,
        per_tensor=per_tensor,
        lr_lag=lr_lag,
        validation=validation,
        schedule=validation,
        foreach=None,
        fused=True,
    )
