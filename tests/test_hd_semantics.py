"""HD-specific behaviour: the reduction happens before the LR changes, schedulers scale the
learned LR, and a tensor skipped at the previous step contributes no hypergradient."""

from __future__ import annotations

import pytest
import torch

import hyperlr_ext as hx


def test_lr_update_uses_the_full_reduction():
    """Every tensor of the group steps with the LR updated from the sum over *all* tensors.

    Updating the LR tensor by tensor (Baydin et al.'s reference AdamHD) would step tensor k with
    an LR that already saw tensors 1..k-1; the per-tensor step ratios would then differ.
    """
    eta0, beta = 0.1, 0.05
    tensors = [torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in (3, 4, 5)]
    opt = hx.SGDHD(tensors, lr=eta0, hyper_lr=beta)
    gen = torch.Generator().manual_seed(0)
    g0 = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in tensors]
    g1 = [torch.randn(t.shape, generator=gen, dtype=torch.float64) + g for t, g in zip(tensors, g0)]
    for t, g in zip(tensors, g0):
        t.grad = g.clone()
    opt.step()
    before = [t.detach().clone() for t in tensors]
    for t, g in zip(tensors, g1):
        t.grad = g.clone()
    opt.step()
    dots = [float(a @ b) for a, b in zip(g1, g0)]
    assert len({round(d, 6) for d in dots}) == 3 and all(abs(d) > 1e-3 for d in dots)
    eta1 = eta0 + beta * sum(dots)
    for t, b, g in zip(tensors, before, g1):
        torch.testing.assert_close(t.detach(), b - eta1 * g, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(opt.param_groups[0]["learned_lr"].item(), eta1)


@pytest.mark.parametrize("cls", [hx.SGDHD, hx.AdamHD])
def test_warmup_from_zero_then_scale(cls):
    """A LambdaLR warm-up starting at lr = 0 (transformers' schedule) gives an effective LR of
    exactly 0, changes no weight, and then scales the learned LR instead of replacing it."""
    w = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = cls([w], lr=0.1, hyper_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(step / 2, 1.0) * 0.5)
    w.grad = torch.ones_like(w)
    opt.step()
    assert opt.param_groups[0]["effective_lr"].item() == 0.0
    assert torch.equal(w.detach(), torch.ones(4, dtype=torch.float64))
    for _ in range(3):
        sched.step()
        w.grad = torch.ones_like(w)
        opt.step()
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.05)
    torch.testing.assert_close(group["effective_lr"], group["learned_lr"] * 0.5)
    assert group["learned_lr"].item() != 0.1  # HD kept learning during the warm-up


def test_step_lr_scales_effective_lr():
    w = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = hx.SGDHD([w], lr=0.1, hyper_lr=1e-2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    for _ in range(5):
        w.grad = torch.full_like(w, 0.5)
        opt.step()
        sched.step()
    group = opt.param_groups[0]
    # After 5 scheduler steps the scale is 0.1**2; effective_lr is what the last step applied
    # (scale 0.1**2 as well: the 5th step ran after four scheduler steps).
    torch.testing.assert_close(group["effective_lr"], group["learned_lr"] * 0.01)
    assert group["learned_lr"].item() > 0.1  # aligned gradients: HD raised the LR


def test_tensor_skipped_at_previous_step_contributes_nothing():
    """d_{t-1} of a tensor that did not move at t-1 is 0, even if its momentum buffer is not."""
    a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    eta0, beta, mom = 0.1, 0.01, 0.9
    opt = hx.SGDHD([a, b], lr=eta0, hyper_lr=beta, momentum=mom)
    ga = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * (k + 1) for k in range(3)]
    gb = torch.tensor([5.0, -1.0, 2.0], dtype=torch.float64)
    a.grad, b.grad = ga[0].clone(), gb.clone()
    opt.step()  # step 0: h = 0, buffers = grads
    a.grad, b.grad = ga[1].clone(), None
    opt.step()  # step 1: only a moves; h = <ga1, ga0>
    eta1 = eta0 + beta * float(ga[1] @ ga[0])
    buf_a = mom * ga[0] + ga[1]
    a.grad, b.grad = ga[2].clone(), gb.clone()
    opt.step()  # step 2: b did not move at step 1, so only <ga2, buf_a> counts
    eta2 = eta1 + beta * float(ga[2] @ buf_a)
    torch.testing.assert_close(opt.param_groups[0]["learned_lr"].item(), eta2, rtol=1e-14, atol=0)
    assert opt.param_groups[0]["hd_stale"] == []


@pytest.mark.parametrize("cls", [hx.SGDHD, hx.AdamHD])
def test_float32_params_get_float32_lr_and_float64_get_float64(cls):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        w = torch.ones(3, dtype=dtype, requires_grad=True)
        opt = cls([w], lr=0.1)
        expected = torch.float64 if dtype == torch.float64 else torch.float32
        assert opt.param_groups[0]["learned_lr"].dtype == expected
        w.grad = torch.ones_like(w)
        opt.step()
        assert w.dtype == dtype and torch.isfinite(w).all()
