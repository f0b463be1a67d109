"""torch.amp.GradScaler with fused HD optimizers (``_step_supports_amp_scaling``): the scaler hands
the step its scale and found_inf as tensors; the kernels unscale on the fly and skip a step with
inf/NaN gradients without a host sync. Checked on the CPU (GradScaler("cpu"))."""

from __future__ import annotations

import copy

import pytest
import torch

import hyperlr_ext as hx
from hyperlr_ext import _ops

pytestmark = pytest.mark.skipif(
    not _ops.EXTENSION_AVAILABLE, reason=f"compiled extension unavailable: {_ops.EXTENSION_ERROR}"
)

OPTIMIZERS = {
    "SGDHD": lambda p, **kw: hx.SGDHD(p, lr=0.05, hyper_lr=0.01, momentum=0.9, **kw),
    "AdamHD": lambda p, **kw: hx.AdamHD(p, lr=0.01, hyper_lr=1e-3, **kw),
    "AdamW-HD": lambda p, **kw: hx.AdamHD(
        p, lr=0.01, hyper_lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True, **kw
    ),
}


def _model_and_data():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    batches = [
        (torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(4)
    ]
    return model, batches


def _state(model, opt):
    group = opt.param_groups[0]
    return [p.detach().clone() for p in model.parameters()] + [
        group[k].clone() for k in ("learned_lr", "hypergrad", "effective_lr")
    ]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("lr_lag", [0, 1])
def test_grad_scaler_step_equals_unscaled_step(name, lr_lag):
    """A power-of-two scale is exact: the scaled run is bit-identical to the plain one."""
    model, batches = _model_and_data()
    scaled_model = copy.deepcopy(model)
    opt = OPTIMIZERS[name](model.parameters(), fused=True, lr_lag=lr_lag)
    scaled_opt = OPTIMIZERS[name](scaled_model.parameters(), fused=True, lr_lag=lr_lag)
    assert scaled_opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        scaled_opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(scaled_model(x), y)).backward()
        scaler.step(scaled_opt)
        scaler.update()
    assert all(
        torch.equal(a, b) for a, b in zip(_state(model, opt), _state(scaled_model, scaled_opt))
    )
    assert not hasattr(scaled_opt, "found_inf")  # the scaler removed what it set


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_skips_inf_step_on_device(name):
    """An inf gradient: weights, momentum and LR state keep their bits; the scale backs off."""
    model, batches = _model_and_data()
    opt = OPTIMIZERS[name](model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step == 2:
            before = _state(model, opt)
            buffers = copy.deepcopy(opt.state_dict()["state"])
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, _state(model, opt)))
            after = opt.state_dict()["state"]
            for i, state in buffers.items():
                assert all(
                    torch.equal(v, after[i][k]) for k, v in state.items() if torch.is_tensor(v)
                )
            assert scaler.get_scale() == 2.0**9
    assert not torch.equal(before[-3], opt.param_groups[0]["learned_lr"])  # later steps learn
