"""torch.amp.GradScaler with fused HD optimizers (``_step_supports_amp_scaling``): the scaler hands
the step its scale and found_inf as tensors; the kernels unscale on the fly and skip a step with
inf/NaN gradients without a host sync. Checked on the CPU (GradScaler("cpu"))."""

from __future__ import annotations

import copy

import pytest
import torch
from sync_guard import NoSync

import hyperlr_ext as hx
from hyperlr_ext import _ops
from hyperlr_ext.optim._marthe_grads import loss_grads

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


def _tiny_model(gen, dtype=torch.float32):
    """A 6-5-1 tanh MLP of ``dtype`` with weights drawn from ``gen``."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    return model


def _model_and_data():
    gen = torch.Generator().manual_seed(0)
    model = _tiny_model(gen)
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


# ---- MARTHE / RTHO: step(closure, scaler=...) and skip_nonfinite ------------------------------
MARTHE_CONFIGS = {
    "sgd-momentum": dict(momentum=0.9, weight_decay=0.01),
    "sgd-dampening": dict(momentum=0.9, dampening=0.1, nesterov=False),
    "adam": dict(inner="adam", betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01),
    "adamw-val": dict(inner="adamw", weight_decay=0.05),
    "rtho-fd": dict(mu=1.0, hvp="finite_difference", momentum=0.5),
    "rtho-fwd-every2": dict(mu=1.0, hvp="forward_difference", hvp_every=2, momentum=0.5),
}


def _marthe(model, name, fused, **kw):
    cfg = dict(MARTHE_CONFIGS[name])
    lr = 0.01 if cfg.get("inner", "sgd") != "sgd" else 0.05
    impl = dict(foreach=True) if fused == "foreach" else dict(fused=fused)
    return hx.MARTHE(model.parameters(), lr=lr, hyper_lr=1e-3, **impl, **cfg, **kw)


def _marthe_model():
    return _tiny_model(torch.Generator().manual_seed(0), torch.float64)


def _marthe_batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=gen, dtype=torch.float64),
         torch.randn(8, 1, generator=gen, dtype=torch.float64))
        for _ in range(n)
    ]  # fmt: skip


def _marthe_snapshot(model, opt):
    """Every tensor a MARTHE step may write: weights, per-parameter state, group tensors."""
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        state = opt.state.get(p, {})
        out += [state[k].clone() for k in sorted(state)]
    group = opt.param_groups[0]
    out += [group[k].clone() for k in sorted(group) if torch.is_tensor(group[k])]
    return out


def _marthe_run(name, fused, batches, *, scaler=None, skip_nonfinite=False):
    """Trains on ``batches``; a batch of None is an inf gradient (inf inputs)."""
    model = _marthe_model()
    opt = _marthe(model, name, fused, skip_nonfinite=skip_nonfinite)
    val = _marthe_batches(1, seed=9)[0]
    val_closure = None
    if name.endswith("-val"):

        def val_closure():
            return torch.nn.functional.mse_loss(model(val[0]), val[1])

    flags, snapshots = [], []
    for x, y in batches:
        snapshots.append(_marthe_snapshot(model, opt))

        def closure(x=x, y=y):
            return torch.nn.functional.mse_loss(model(x), y)

        with NoSync():  # the check, the skip and the scaler's bookkeeping stay on the device
            opt.step(closure, val_closure, scaler=scaler)
        if scaler is not None:
            flags.append(float(opt.nonfinite_step))
            scaler.update()
    return model, opt, snapshots, flags


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("fused", [False, "foreach", True], ids=["reference", "foreach", "fused"])
@pytest.mark.parametrize("name", list(MARTHE_CONFIGS))
def test_marthe_grad_scaler_is_exact(name, fused):
    """Scaling the losses by a power of two and unscaling the gradients and Hessian products is
    exact: bit-identical to the run without a scaler."""
    batches = _marthe_batches(6)
    model, opt, _, _ = _marthe_run(name, fused, batches)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    scaled_model, scaled_opt, _, flags = _marthe_run(name, fused, batches, scaler=scaler)
    assert flags == [0.0] * len(batches)
    assert scaler.get_scale() == 2.0**15  # grew every 2 clean steps: the scaler saw each check
    assert _same(_marthe_snapshot(model, opt), _marthe_snapshot(scaled_model, scaled_opt))
    assert float(opt.param_groups[0]["learned_lr"]) != _lr0(name)  # the LR did move


def _lr0(name):
    return 0.01 if MARTHE_CONFIGS[name].get("inner", "sgd") != "sgd" else 0.05


def _with_inf_batch(batches, at):
    x, y = batches[at]
    bad = x.clone()
    bad[0, 0] = float("inf")
    return batches[:at] + [(bad, y)] + batches[at:]


@pytest.mark.parametrize("mode", ["scaler", "skip_nonfinite"])
@pytest.mark.parametrize("fused", [False, "foreach", True], ids=["reference", "foreach", "fused"])
@pytest.mark.parametrize("name", list(MARTHE_CONFIGS))
def test_marthe_inf_step_changes_nothing(name, fused, mode):
    """An inf gradient at step 3: weights, tangents, buffers, step counts and LR state keep their
    bits, and the rest of the run is bit-identical to a run that never saw that batch (except
    with ``hvp_every``: the skipped step counts on the host, so the later products fall one
    step later than in that run)."""
    batches = _marthe_batches(6)
    with_inf = _with_inf_batch(batches, 3)
    kw = (
        dict(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=100))
        if mode == "scaler"
        else dict(skip_nonfinite=True)
    )
    model, opt, snapshots, flags = _marthe_run(name, fused, with_inf, **kw)
    assert _same(snapshots[3], snapshots[4])
    if mode == "scaler":
        assert [f != 0 for f in flags] == [False, False, False, True, False, False, False]
        assert kw["scaler"].get_scale() == 2.0**11  # backed off once
    if "hvp_every" in MARTHE_CONFIGS[name]:
        return
    clean_model, clean_opt, _, _ = _marthe_run(name, fused, batches)
    assert _same(_marthe_snapshot(model, opt), _marthe_snapshot(clean_model, clean_opt))


@pytest.mark.parametrize("fused", [False, "foreach", True], ids=["reference", "foreach", "fused"])
@pytest.mark.parametrize("name", ["sgd-momentum", "adam"])
def test_marthe_inf_first_step(name, fused):
    """A first step with an inf gradient moves nothing; the state it creates is the zero state,
    so the run goes on as one that started a step later (SGD without dampening, Adam)."""
    batches = _marthe_batches(4)
    model, opt, snapshots, _ = _marthe_run(
        name, fused, _with_inf_batch(batches, 0), skip_nonfinite=True
    )
    n = len(list(model.parameters()))
    assert _same(snapshots[0][:n], snapshots[1][:n])  # the weights did not move
    clean_model, clean_opt, _, _ = _marthe_run(name, fused, batches)
    assert _same(list(model.parameters()), list(clean_model.parameters()))
    for key in ("learned_lr", "hypergrad"):
        assert torch.equal(opt.param_groups[0][key], clean_opt.param_groups[0][key])


def test_marthe_inf_hessian_product_is_caught():
    """The Hessian product is checked too: a loss whose gradient is finite but whose Hessian
    product is not (a kink made infinite) skips the step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = hx.MARTHE([w], lr=0.1, hyper_lr=1e-3, skip_nonfinite=True)
    opt.step(lambda: (w**2).sum())
    opt.step(lambda: (w**2).sum())
    before = [w.detach().clone(), opt.state[w]["z_param"].clone()]
    assert float(opt.state[w]["z_param"].abs().max()) > 2  # so that 1e308 * z overflows

    def closure():
        # c (w - w0)^2 at w = w0 adds 0 to the loss and 2c (w - w0) = 0 to the gradient, but
        # 2c = 1e308 to the Hessian: H z overflows to inf while the gradient stays finite.
        return (w**2).sum() + 5e307 * ((w - w.detach()) ** 2).sum()

    loss, grads = loss_grads(closure, [w], graph=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    opt.step(closure)
    assert float(opt.nonfinite_step) != 0.0
    assert torch.equal(before[0], w.detach()) and torch.equal(before[1], opt.state[w]["z_param"])


def test_marthe_scaler_errors():
    model = _marthe_model()
    opt = hx.MARTHE(model.parameters(), lr=0.05, hyper_lr=1e-3)
    x, y = _marthe_batches(1)[0]

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        opt.step(closure, scaler=object())
    scaler = torch.amp.GradScaler("cpu")
    opt.step(closure, scaler=scaler)
    with pytest.raises(RuntimeError, match="since the last scaler.update"):
        opt.step(closure, scaler=scaler)
    scaler.update()
    opt.step(closure, scaler=scaler)  # fine again
    with pytest.raises(ValueError, match="skip_nonfinite"):
        hx.MARTHE(model.parameters(), skip_nonfinite="yes")
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    opt.step(closure, scaler=disabled)  # a disabled scaler is no scaler


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, "foreach", True], ids=["reference", "foreach", "fused"])
def test_marthe_low_precision_params(dtype, fused):
    """bf16/fp16 parameters: the hyper-state is float32 and a bf16 autocast closure with a scaler
    trains (the kernels' low-precision arithmetic is checked in test_tangent_ops.py)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model = model.to(dtype)
    x, y = torch.randn(8, 6, dtype=dtype), torch.randn(8, 1, dtype=dtype)
    impl = dict(foreach=True) if fused == "foreach" else dict(fused=fused)
    opt = hx.MARTHE(model.parameters(), lr=0.05, hyper_lr=1e-3, momentum=0.9, **impl)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    losses = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(
                float(opt.step(lambda: torch.nn.functional.mse_loss(model(x), y), scaler=scaler))
            )
        scaler.update()
    assert opt.param_groups[0]["learned_lr"].dtype == torch.float32
    assert all(p.dtype == dtype for p in model.parameters())
    assert losses[-1] < 0.2 * losses[0]


# ---- TLR and MLR-SNet after a step GradScaler skipped ------------------------------------------
def _f32_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _f32_batches(n, seed=4):
    gen = torch.Generator().manual_seed(seed)
    # Targets of scale 16: a loss of some hundreds, so that 2^127 times it overflows float32.
    return [(torch.randn(16, 6, generator=gen), 16 * torch.randn(16, 1, generator=gen))
            for _ in range(n)]  # fmt: skip


SCHEDULERS = {
    "TLR": lambda opt: hx.TLR(opt, gamma=0.5, update_every=2),
    "MLRSNet": lambda opt: hx.MLRSNet(opt, meta_every=2),
}


def _scheduled_run(name, batches, *, scaler=None, optimizer=None):
    """SGD with momentum (or ``optimizer``) under a scheduler; returns the model, the optimizer,
    the scheduler and, per step, whether the optimizer stepped (scaler runs only)."""
    model = _f32_model()
    opt = (optimizer or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)))(model.parameters())
    sched = SCHEDULERS[name](opt)
    val = _f32_batches(1, seed=99)[0]
    ran = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            ran.append(scaler.get_scale() == scale)  # the scale backs off after a skipped step
        if name == "TLR":
            sched.step()
        else:
            sched.step(loss.detach(), val_closure=lambda: torch.nn.functional.mse_loss(
                model(val[0]), val[1]))  # fmt: skip
    return model, opt, sched, ran


def _scheduler_state(name, sched):
    if name == "TLR":
        return [sched.last_epoch, sched.window_step, sched.windows, sched.snapshots,
                sched.prev_updates]  # fmt: skip
    return [sched.steps, sched.val_steps, sched.last_epoch, list(sched.lstm_state), sched.last_p,
            sched.net.state_dict(), sched.last_hypergrad]  # fmt: skip


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_ignores_steps_the_scaler_skipped(name):
    """A scale of 2^127 overflows the first gradients: GradScaler skips those steps (it does not
    call optimizer.step()) and backs off. The scheduler must not count them: the whole run —
    weights, LRs, the scheduler's windows / LSTM / net — is bit-identical to one that never saw
    the skipped batches (power-of-two scales are exact)."""
    batches = _f32_batches(12)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=10**6)
    model, opt, sched, ran = _scheduled_run(name, batches, scaler=scaler)
    assert not ran[0] and sum(ran) >= 4  # skipped steps and steps that ran
    kept = [batch for batch, stepped in zip(batches, ran) if stepped]
    ref_model, ref_opt, ref_sched, _ = _scheduled_run(name, kept)
    assert _same(list(model.parameters()), list(ref_model.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert _same(_scheduler_state(name, sched), _scheduler_state(name, ref_sched))


def test_mlr_snet_ignores_a_step_skipped_on_the_device():
    """SGDHD(fused) takes the scaler's found_inf itself and skips on the device; MLR-SNet reads
    its ``nonfinite_step`` flag: LSTM state, LR and net keep their bits, with no host read."""
    batches = _f32_batches(6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=10**6)

    def sgd_hd(p):
        return hx.SGDHD(p, lr=0.05, hyper_lr=1e-3, momentum=0.9, fused=True)

    model = _f32_model()
    opt = sgd_hd(model.parameters())
    sched = hx.MLRSNet(opt, meta_every=1)
    states = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)  # calls opt.step(): the skip is decided on the device
        scaler.update()
        sched.step(loss.detach(), val_closure=lambda x=x, y=y: torch.nn.functional.mse_loss(
            model(x), y))  # fmt: skip
        states.append(
            [float(opt.nonfinite_step)] + _scheduler_state("MLRSNet", sched)[3:6]
            + [opt.param_groups[0]["lr"]]
        )  # fmt: skip
    flags = [s[0] for s in states]
    assert flags[0] != 0 and flags[-1] == 0  # the first step skipped, the last one ran
    first_run = flags.index(0.0)
    assert first_run >= 2  # at least two skipped steps to compare
    for before, after in zip(states[: first_run - 1], states[1:first_run]):
        assert _same(before[1:], after[1:])  # nothing moved while steps were skipped
    assert not _same(states[first_run - 1][1:], states[-1][1:])  # and moved afterwards
