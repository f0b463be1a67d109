"""MARTHE / RTHO with SGD dynamics (hyperlr_ext/optim/marthe.py) against exact references:

- the tangent hypergradient equals dE(w_T)/d eta from autograd through the unrolled trajectory
  (float64, T = 20 minibatch steps, SGD / momentum / Nesterov with L2 decay, training or
  validation objective), with Hessian products by double backward or finite differences;
- MARTHE's adaptive mu and beta against an oracle written from docs/design.md on a quadratic whose
  Hessian is explicit;
- mu = 0 reproduces SGDHD, beta = 0 reproduces torch.optim.SGD; LR >= 0; no host sync; errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from optim_table import materialise_in_place
from sync_guard import NoSync
from torch.func import functional_call

import hyperlr_ext as hx
from hyperlr_ext.optim._marthe_grads import objective_grads

SGD_CONFIGS = {
    "sgd": dict(momentum=0.0, weight_decay=0.01),
    "momentum": dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=0.02),
}
ADAM_CONFIGS = {
    "adam": dict(inner="adam", betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01),
    "adamw": dict(inner="adamw", betas=(0.8, 0.999), eps=1e-8, weight_decay=0.05),
}
CONFIGS = {**SGD_CONFIGS, **ADAM_CONFIGS}
LRS = {"sgd": 0.05, "adam": 0.01}


def _lr(name):
    return LRS["adam" if name in ADAM_CONFIGS else "sgd"]


def _model():
    torch.manual_seed(0)
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


def _loss(model, weights, batch):
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    out = functional_call(model, dict(zip(names, weights)), (x,))
    return torch.nn.functional.mse_loss(out, y)


def _graph_grads(model, w, batch, t):
    """The loss gradient at step ``t`` of an unrolled trajectory, differentiable in ``w``."""
    return torch.autograd.grad(_loss(model, w, batch), w, create_graph=True)


def _unrolled_hypergrad(model, batches, lr, cfg, val_batch=None, grads=_graph_grads):
    """dE(w_T)/d eta for a constant eta, by autograd through T steps of the inner optimizer.
    ``grads(model, w, batch, t)``: the loss gradient of step t (its derivative in w is the
    Hessian the tangent propagates)."""
    if cfg.get("inner", "sgd") != "sgd":
        return _unrolled_adam_hypergrad(model, batches, lr, cfg, val_batch, grads)
    return _unrolled_sgd_hypergrad(model, batches, lr, cfg, val_batch, grads)


def _unrolled_adam_hypergrad(model, batches, lr, cfg, val_batch, grads):
    """Through T steps of Adam / AdamW as torch.optim's documentation writes them: m_hat =
    m / (1 - beta1^t), v_hat = v / (1 - beta2^t), w -= eta m_hat / (sqrt(v_hat) + eps); AdamW
    first w -= eta lambda w, Adam adds lambda w to the gradient (and E has the L2 term)."""
    eta = torch.tensor(lr, dtype=torch.float64, requires_grad=True)
    beta1, beta2 = cfg["betas"]
    eps, wd, adamw = cfg["eps"], cfg["weight_decay"], cfg["inner"] == "adamw"
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, batch in enumerate(batches[:-1], start=1):
        new_w = []
        for i, (wi, gi) in enumerate(zip(w, grads(model, w, batch, t - 1))):
            if adamw:
                wi = wi - eta * wd * wi
            else:
                gi = gi + wd * wi
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            v[i] = beta2 * v[i] + (1 - beta2) * gi * gi
            m_hat, v_hat = m[i] / (1 - beta1**t), v[i] / (1 - beta2**t)
            new_w.append(wi - eta * m_hat / (v_hat.sqrt() + eps))
        w = new_w
    if val_batch is not None:
        objective = _loss(model, w, val_batch)
    elif adamw:
        objective = _loss(model, w, batches[-1])
    else:
        objective = _loss(model, w, batches[-1]) + 0.5 * wd * sum((wi * wi).sum() for wi in w)
    return torch.autograd.grad(objective, eta)[0]


def _unrolled_sgd_hypergrad(model, batches, lr, cfg, val_batch, grads):
    """Through T steps of torch.optim.SGD's update written out from its documentation (L2 decay
    in the gradient, first buffer = gradient)."""
    eta = torch.tensor(lr, dtype=torch.float64, requires_grad=True)
    m, tau = cfg.get("momentum", 0.0), cfg.get("dampening", 0.0)
    wd, nesterov = cfg.get("weight_decay", 0.0), cfg.get("nesterov", False)
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    bufs = [None] * len(w)
    for t, batch in enumerate(batches[:-1]):
        new_w = []
        for i, (wi, gi) in enumerate(zip(w, grads(model, w, batch, t))):
            gi = gi + wd * wi
            if m != 0:
                bufs[i] = gi if bufs[i] is None else m * bufs[i] + (1 - tau) * gi
                di = gi + m * bufs[i] if nesterov else bufs[i]
            else:
                di = gi
            new_w.append(wi - eta * di)
        w = new_w
    if val_batch is None:
        objective = _loss(model, w, batches[-1]) + 0.5 * wd * sum((wi * wi).sum() for wi in w)
    else:
        objective = _loss(model, w, val_batch)
    return torch.autograd.grad(objective, eta)[0]


def _run(opt, model, batches, val_batch=None):
    for batch in batches:
        closure = lambda b=batch: _loss(model, list(model.parameters()), b)  # noqa: E731
        val = None
        if val_batch is not None:
            val = lambda: _loss(model, list(model.parameters()), val_batch)  # noqa: E731
        opt.step(closure, val_closure=val)


def _impl(fused):
    """The implementation keywords: fused=False/None, or "foreach" for foreach=True."""
    return dict(foreach=True) if fused == "foreach" else dict(fused=fused)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("validation", [False, True])
@pytest.mark.parametrize(
    "hvp, fused",
    [("autograd", False), ("autograd", "foreach"), ("autograd", None), ("finite_difference", None)],
)
def test_tangent_hypergradient_is_exact(name, validation, hvp, fused):
    """mu = 1, beta = 0: after T = 20 steps, Delta_T = dE(w_T)/d eta (autograd, unrolled), by
    the reference tangent step (fused=False), its list-op form (foreach=True) and the default
    one (the fused kernel where the extension is built)."""
    cfg = CONFIGS[name]
    model = _model()
    batches = _batches(21)
    val_batch = _batches(1, seed=9)[0] if validation else None
    lr = _lr(name)
    expected = _unrolled_hypergrad(model, batches, lr, cfg, val_batch)
    opt = hx.RTHO(model.parameters(), lr=lr, hyper_lr=0.0, hvp=hvp, **_impl(fused), **cfg)
    _run(opt, model, batches, val_batch)  # the 21st step computes Delta_20 (beta = 0: no change)
    got = opt.param_groups[0]["hypergrad"]
    rtol = 1e-8 if hvp == "autograd" else 1e-5
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0.0)
    assert expected.abs() > 1e-6  # the comparison means something


def _quadratic_oracle(a, centres, w0, *, lr, beta, beta_prime, momentum, wd, steps):
    """MARTHE from docs/design.md ("Tangent-system methods") on
    L_t(w) = 1/2 (w - c_t)^T A (w - c_t): H = A."""
    w, z_w, z_b, b, d_prev = w0.clone(), torch.zeros_like(w0), None, None, None
    eta, mu, c, delta_prev = lr, 0.0, 0.0, 0.0
    trace = []
    for t in range(steps):
        g = a @ (w - centres[t]) + wd * w
        if t > 0:
            delta = float(z_w @ g)
            g_prime = -float(d_prev @ g)
            q_tilde = min(max(delta * g_prime / g_prime**2, 0.0), 1.0) if g_prime != 0 else 0.0
            mu, c = q_tilde ** (1.0 / (c + 1.0)), mu * (1.0 + c)
            beta = max(beta + beta_prime * delta * delta_prev, 0.0)
            eta = max(eta - beta * delta, 0.0)
            delta_prev = delta
        zw, zb = mu * z_w, (mu * z_b if z_b is not None else None)
        hz = a @ zw + wd * zw
        if momentum:
            if b is None:
                b, z_b = g.clone(), hz.clone()
            else:
                b, z_b = momentum * b + g, momentum * zb + hz
            d, z_d = b, z_b
        else:
            d, z_d = g, hz
        z_w = zw - eta * z_d - d
        w = w - eta * d
        d_prev = d
        trace.append((eta, mu, beta, w.clone()))
    return trace


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_adaptive_mu_and_beta_match_the_oracle(momentum):
    gen = torch.Generator().manual_seed(3)
    n = 5
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.linspace(0.5, 3.0, n, dtype=torch.float64)) @ q.T
    centres = [torch.randn(n, generator=gen, dtype=torch.float64) * 0.3 + 1.0 for _ in range(15)]
    w0 = torch.zeros(n, dtype=torch.float64)
    settings = dict(lr=0.05, beta=1e-3, beta_prime=1e-4, momentum=momentum, wd=0.01, steps=15)
    trace = _quadratic_oracle(a, centres, w0, **settings)

    w = torch.nn.Parameter(w0.clone())
    opt = hx.MARTHE([w], lr=0.05, hyper_lr=1e-3, hyper_hyper_lr=1e-4, momentum=momentum,
                    weight_decay=0.01)  # fmt: skip
    mus = []
    for t in range(15):
        opt.step(lambda t=t: 0.5 * (w - centres[t]) @ a @ (w - centres[t]))
        group = opt.param_groups[0]
        eta, mu, beta, w_ref = trace[t]
        torch.testing.assert_close(group["learned_lr"].item(), eta, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(group["learned_mu"].item(), mu, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(group["adapted_hyper_lr"].item(), beta, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(w.detach(), w_ref, rtol=1e-10, atol=1e-12)
        mus.append(mu)
    assert 0 < max(mus) <= 1 and min(mus[1:]) < 1  # mu adapts (not stuck at 0 or 1)


def _torch_and_hd(name, cfg, hd_params, torch_params, lr, hyper_lr):
    """The HD optimizer (mu = 0) and the torch.optim optimizer (beta = 0) to compare with."""
    if name in SGD_CONFIGS:
        return (
            hx.SGDHD(hd_params, lr=lr, hyper_lr=hyper_lr, foreach=False, **cfg),
            torch.optim.SGD(torch_params, lr=lr, **cfg),
        )
    adam = {k: v for k, v in cfg.items() if k != "inner"}
    decoupled = cfg["inner"] == "adamw"
    torch_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return (
        hx.AdamHD(hd_params, lr=lr, hyper_lr=hyper_lr, decoupled_weight_decay=decoupled,
                  foreach=False, **adam),
        torch_cls(torch_params, lr=lr, foreach=False, **adam),
    )  # fmt: skip


@pytest.mark.parametrize("fused", [False, "foreach", None])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mu_zero_is_hd_and_beta_zero_is_torch(name, fused):
    cfg, lr = CONFIGS[name], _lr(name)
    hyper_lr = 0.01 if name in SGD_CONFIGS else 1e-4
    batches = _batches(12)
    models = {k: _model() for k in ("marthe", "hd", "rtho", "torch")}
    hd, reference = _torch_and_hd(
        name, cfg, models["hd"].parameters(), models["torch"].parameters(), lr, hyper_lr
    )
    opts = {
        "marthe": hx.MARTHE(models["marthe"].parameters(), lr=lr, hyper_lr=hyper_lr, mu=0.0,
                            **_impl(fused), **cfg),
        "hd": hd,
        "rtho": hx.RTHO(models["rtho"].parameters(), lr=lr, hyper_lr=0.0, **_impl(fused),
                        **cfg),
        "torch": reference,
    }  # fmt: skip
    for batch in batches:
        for k in ("marthe", "rtho"):
            m = models[k]
            opts[k].step(lambda m=m: _loss(m, list(m.parameters()), batch))
        for k in ("hd", "torch"):
            m = models[k]
            opts[k].zero_grad()
            _loss(m, list(m.parameters()), batch).backward()
            opts[k].step()
    for a, b in (("marthe", "hd"), ("rtho", "torch")):
        for p, q in zip(models[a].parameters(), models[b].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        opts["marthe"].param_groups[0]["learned_lr"], opts["hd"].param_groups[0]["learned_lr"],
        rtol=1e-11, atol=1e-15,
    )  # fmt: skip
    assert opts["marthe"].param_groups[0]["learned_lr"] != lr  # the LR moved


def test_lr_stays_non_negative():
    model = _model()
    opt = hx.RTHO(model.parameters(), lr=1e-3, hyper_lr=1e3)  # a huge hyper-LR drives eta to 0
    _run(opt, model, _batches(6))
    lr = opt.param_groups[0]["learned_lr"]
    assert lr >= 0 and (lr == 0 or opt.param_groups[0]["hypergrad"] < 0)


@pytest.mark.parametrize("mu", ["adaptive", 1.0])
def test_step_never_syncs(mu):
    model = _model()
    opt = hx.MARTHE(model.parameters(), lr=0.05, hyper_lr=0.01, hyper_hyper_lr=0.1, mu=mu,
                    momentum=0.9)  # fmt: skip
    batches = _batches(4)
    with NoSync():
        with pytest.raises(AssertionError, match="sync"):
            torch.ones(()).item()
        _run(opt, model, batches)


class _OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_errors():
    model = _model()
    params = list(model.parameters())
    batch = _batches(1)[0]
    with pytest.raises(ValueError, match="inner"):
        hx.MARTHE(params, inner="lbfgs")
    with pytest.raises(ValueError, match="SGD settings"):
        hx.MARTHE(params, inner="adam", momentum=0.9)
    with pytest.raises(ValueError, match="betas"):
        hx.MARTHE(params, inner="adam", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="mu"):
        hx.MARTHE(params, mu=1.5)
    with pytest.raises(ValueError, match="hvp"):
        hx.MARTHE(params, hvp="exact")
    opt = hx.RTHO(params, lr=0.05, hyper_lr=0.01)

    def calls_backward():
        loss = _loss(model, params, batch)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="without calling backward"):
        opt.step(calls_backward)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: model(batch[0]))

    # A model without double backward: a clear error that names hvp="finite_difference", which
    # then works.
    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))

    def loss_once():
        return (_OnceDifferentiableTanh.apply(w) ** 2).sum()

    opt = hx.RTHO([w], lr=0.05, hyper_lr=0.01)
    opt.step(loss_once)  # the first step needs no Hessian product
    with pytest.raises(RuntimeError, match='hvp="finite_difference"'):
        opt.step(loss_once)
    opt = hx.RTHO([copy.deepcopy(w)], lr=0.05, hyper_lr=0.01, hvp="finite_difference")
    v = opt.param_groups[0]["params"][0]
    for _ in range(3):
        opt.step(lambda: (_OnceDifferentiableTanh.apply(v) ** 2).sum())


def test_state_dict_resume_is_bit_identical():
    cfg = dict(momentum=0.9, weight_decay=0.01)
    batches = _batches(10)
    model = _model()
    opt = hx.MARTHE(model.parameters(), lr=0.05, hyper_lr=1e-3, hyper_hyper_lr=1e-4, **cfg)
    _run(opt, model, batches[:5])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    _run(opt, model, batches[5:])

    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = hx.MARTHE(resumed.parameters(), lr=0.05, hyper_lr=1e-3, hyper_hyper_lr=1e-4, **cfg)
    opt2.load_state_dict(saved)
    _run(opt2, resumed, batches[5:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    for key in ("learned_lr", "learned_mu", "adapted_hyper_lr", "hypergrad"):
        assert torch.equal(opt.param_groups[0][key], opt2.param_groups[0][key])


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_state_dict_resume_is_bit_identical_for_every_inner(name):
    cfg = CONFIGS[name]
    batches = _batches(8)
    model = _model()
    kwargs = dict(lr=_lr(name), hyper_lr=1e-4, hyper_hyper_lr=1e-5, **cfg)
    opt = hx.MARTHE(model.parameters(), **kwargs)
    _run(opt, model, batches[:4])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    _run(opt, model, batches[4:])
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = hx.MARTHE(resumed.parameters(), **kwargs)
    opt2.load_state_dict(saved)
    _run(opt2, resumed, batches[4:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    for key in ("learned_lr", "learned_mu", "adapted_hyper_lr", "hypergrad"):
        assert torch.equal(opt.param_groups[0][key], opt2.param_groups[0][key])


@pytest.mark.parametrize("fused", [False, "foreach", None])
@pytest.mark.parametrize("inner", ["adam", "adamw"])
def test_adam_step_never_syncs(inner, fused):
    model = _model()
    opt = hx.MARTHE(model.parameters(), lr=0.01, hyper_lr=1e-4, hyper_hyper_lr=1e-3,
                    inner=inner, weight_decay=0.01, **_impl(fused))  # fmt: skip
    with NoSync():
        _run(opt, model, _batches(4))


def test_find_hyper_lr_divides_until_a_short_run_does_not_diverge():
    """On L(w) = 1/2 a w^2 a large hyper-LR drives eta past 2/a and the run diverges. The search
    returns the largest start / 10^k whose run stays finite and does not end above twice the
    first loss (checked here by running each candidate), and leaves the weights unchanged."""
    a = 4.0
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))

    def closure():
        return 0.5 * a * (w * w).sum()

    found = hx.RTHO.find_hyper_lr([w], closure, steps=60, start=10.0, lr=0.01)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))

    def diverges(beta):
        v = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        opt = hx.RTHO([v], lr=0.01, hyper_lr=beta)
        losses = [float(opt.step(lambda: 0.5 * a * (v * v).sum())) for _ in range(60)]
        finite = all(torch.isfinite(torch.tensor(losses)))
        return not finite or sum(losses[-6:]) / 6 > 2 * losses[0]

    exponent = round(torch.log10(torch.tensor(10.0 / found)).item())
    assert found == pytest.approx(10.0 / 10**exponent)
    assert exponent >= 1 and diverges(found * 10) and not diverges(found)
    with pytest.raises(RuntimeError, match="diverged"):
        hx.RTHO.find_hyper_lr([w], lambda: closure() * float("nan"), steps=3, smallest=1e-3)
    with pytest.raises(ValueError, match="argument"):
        hx.MARTHE.find_hyper_lr([w], closure, argument="lr")


def test_find_hyper_lr_restores_buffers_too():
    """The closure of a model with BatchNorm in training mode updates its running statistics;
    with ``buffers=model.buffers()`` the search leaves them, and the weights, as it found them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 1)).double()  # fmt: skip
    x = torch.randn(16, 3, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def closure():
        return model(x).pow(2).mean()

    hx.RTHO.find_hyper_lr(model.parameters(), closure, steps=3, start=1e-3, lr=0.01,
                          buffers=model.buffers())  # fmt: skip
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    hx.RTHO.find_hyper_lr(model.parameters(), closure, steps=3, start=1e-3, lr=0.01)
    assert not torch.equal(before["1.running_mean"], model.state_dict()["1.running_mean"])


def test_marthe_weight_decay_objective_builds_no_graph():
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = hx.MARTHE([w], lr=0.1, hyper_lr=1e-3, weight_decay=0.1)
    (objective,) = objective_grads(opt.param_groups[0], [w], [torch.ones(3)], None)
    assert not objective.requires_grad
    torch.testing.assert_close(objective, torch.full((3,), 1.1, dtype=torch.float64))


@pytest.mark.parametrize("name", ["momentum", "adamw"])
def test_scheduler_scales_the_learned_lr(name):
    """A torch scheduler's factor s multiplies the learned LR (as for the HD optimizers): the run
    follows the inner optimizer with LR s * eta, and the tangent carries s (B = -s d), so
    Delta = dE/d eta = s * dE/d(s eta) (autograd through the trajectory with LR s * eta)."""
    cfg, lr, s = CONFIGS[name], _lr(name), 0.5
    model = _model()
    batches = _batches(11)
    expected = s * _unrolled_hypergrad(model, batches, s * lr, cfg)
    opt = hx.RTHO(model.parameters(), lr=lr, hyper_lr=0.0, **cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: s)
    _run(opt, model, batches)
    group = opt.param_groups[0]
    assert sched.get_last_lr() == [s * lr]
    torch.testing.assert_close(group["hypergrad"], expected, rtol=1e-8, atol=0.0)
    torch.testing.assert_close(group["effective_lr"], torch.tensor(s * lr, dtype=torch.float64))


def test_params_the_loss_does_not_reach_keep_still():
    """A parameter outside the loss (a frozen branch, an unused head) has a zero gradient and a
    zero Hessian row: it does not move and does not break the Hessian product."""
    model = _model()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = hx.RTHO([*model.parameters(), unused], lr=0.05, hyper_lr=1e-3, momentum=0.9)
    _run(opt, model, _batches(3))
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert torch.isfinite(opt.param_groups[0]["learned_lr"])


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_deepcopy_copies_all_public_attrs(inner):
    """torch.optim's contract: a deepcopy has every public attribute, before and after steps."""
    model = _model()
    opt = hx.MARTHE(model.parameters(), lr=0.01, inner=inner, skip_nonfinite=True)
    for _ in range(2):
        clone = copy.deepcopy(opt)
        public = {k for k in vars(opt) if not k.startswith("_")}
        assert {k for k in vars(clone) if not k.startswith("_")} == public
        assert clone.distributed == opt.distributed
        _run(opt, model, _batches(2))
    assert isinstance(opt.nonfinite_step, torch.Tensor)
    assert torch.equal(copy.deepcopy(opt).nonfinite_step, opt.nonfinite_step)


def test_fused_accepts_meta_params_until_step():
    """fused=True takes meta parameters (deferred initialisation); step() refuses them with
    torch's message; materialised in place, the optimizer steps like one built on them."""
    if not hx._ops.EXTENSION_AVAILABLE:
        pytest.skip("needs the compiled extension")
    with torch.device("meta"):
        model = _model()
    opt = hx.MARTHE(model.parameters(), lr=0.01, fused=True)
    with pytest.raises(RuntimeError, match=r"^`fused=True` requires all the params to be"):
        _run(opt, model, _batches(1))
    materialise_in_place(model)
    reference = _model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            p.copy_(q)
    ref_opt = hx.MARTHE(reference.parameters(), lr=0.01, fused=True)
    _run(opt, model, _batches(3))
    _run(ref_opt, reference, _batches(3))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert torch.equal(opt.param_groups[0]["learned_lr"], ref_opt.param_groups[0]["learned_lr"])
