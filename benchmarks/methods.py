"""The methods of the main benchmark: every optimizer and scheduler of the package and the
baselines people use instead, each behind one small training-step protocol.

A :class:`Method` builds a :class:`Trainer` for a model; ``Trainer.step(loss_fn, val_fn)`` runs
one training step (whatever the method needs: backward + step, a closure, a validation loss)
and returns the detached training loss; ``Trainer.lr()`` is the LR the method applies now (the
learned one for hypergradient methods, ``d * lr`` for D-Adaptation / Prodigy, ...).

Settings are fixed here, printed in the report, and never tuned per seed or per task. Where a
method has its own hyper-LR (HD, RTHO, MARTHE) the value is the one its paper recommends or, for
MARTHE's beta', one chosen once on the digits validation split (README.md says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hyperlr_ext as hx
from hyperlr_ext.optim import ROBUST_PRESET

LossFn = Callable[[], Tensor]
SGD_LRS = (1e-3, 1e-2, 1e-1, 1.0)  # three decades
ADAM_LRS = (1e-4, 1e-3, 1e-2, 1e-1)


class BatchLoss:
    """The cross-entropy of ``model`` on one batch, as a closure; ``head(fraction)`` is the same
    loss on the batch's first ``fraction`` of samples (the batches are drawn in random order, so
    a random subsample), for MARTHE's ``hvp_closure``."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.model, self.x, self.y = model, x, y

    def __call__(self) -> Tensor:
        return F.cross_entropy(self.model(self.x), self.y)

    def head(self, fraction: float) -> BatchLoss:
        n = max(1, round(len(self.x) * fraction))
        return BatchLoss(self.model, self.x[:n], self.y[:n])


def _group_lr(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    if "effective_lr" in group:
        return float(group["effective_lr"].float().mean())
    if "d" in group:  # D-Adaptation, Prodigy: the step is d * lr
        return float(group["d"]) * float(group["lr"])
    return float(group["lr"])


@dataclass
class Trainer:
    """One method's training step on one model."""

    opt: torch.optim.Optimizer
    kind: str  # "backward", "closure" (MARTHE/RTHO), "mlr" (MLR-SNet), "sf" (schedule-free)
    sched: Any = None
    val: bool = False  # the method reads a validation loss
    lr_fn: Callable[[], float] | None = None
    hvp_fraction: float | None = None  # MARTHE's Hessian product on this part of the batch

    def step(self, loss_fn: LossFn, val_fn: LossFn) -> Tensor:
        if self.kind == "closure":
            hvp = None if self.hvp_fraction is None else loss_fn.head(self.hvp_fraction)
            return self.opt.step(loss_fn, val_closure=val_fn if self.val else None,
                                 hvp_closure=hvp)  # fmt: skip
        if self.kind == "sf":
            self.opt.train()
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        if self.val:
            self.opt.step(val_closure=val_fn)
        else:
            self.opt.step()
        if self.kind == "mlr":
            self.sched.step(loss.detach(), val_closure=val_fn if self.sched.train else None)
        elif self.sched is not None:
            self.sched.step()
        return loss.detach()

    def eval_mode(self) -> None:
        if self.kind == "sf":
            self.opt.eval()

    def lr(self) -> float:
        return self.lr_fn() if self.lr_fn is not None else _group_lr(self.opt)


@dataclass(frozen=True)
class Context:
    """What a method may use besides the model: its initial LR and the run's length."""

    lr: float
    steps_per_epoch: int
    total_steps: int
    hyper_scale: float = 1.0  # the beta axis: every hyper-LR times this

    def beta(self, hyper_lr: float) -> float:
        """A method's hyper-LR on the beta axis (its fixed value times ``hyper_scale``)."""
        return hyper_lr * self.hyper_scale


IMAGES = ("logreg", "mlp", "cnn")  # the image classifiers' models
EVERY_MODEL = (*IMAGES, "gpt")  # and the language model's
LM_ONLY = ("gpt",)


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "baseline", "HD", "tangent", "scheduler", "LR-free"
    lrs: tuple[float, ...] | None  # the initial-LR grid, or None: the method needs no LR
    build: Callable[[nn.Module, Context], Trainer] = field(repr=False)
    settings: str = ""
    # The models it trains: the SGD and Adam families the image classifiers only, the AdamW
    # family written for the language model that only (transformers train with decoupled
    # weight decay: Adam's rows there would only repeat AdamW's).
    models: tuple[str, ...] = IMAGES


MOMENTUM = dict(momentum=0.9)
WEIGHT_DECAY = 0.01  # AdamW's (torch's default)
WARMUP_STEPS = 30
NESTEROV = dict(momentum=0.9, nesterov=True)
ROBUST_ALPHA = ROBUST_PRESET["hyper_lr"]  # the preset's step on log eta (the beta axis scales it)
MARTHE_SETTINGS = dict(hyper_lr=1e-5, hyper_hyper_lr=1e-6, **MOMENTUM)


def _sgd(model: nn.Module, c: Context, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=c.lr, **kw)


def _step_decay(model, c):
    opt = _sgd(model, c, **MOMENTUM)
    milestones = [c.total_steps // 2, 3 * c.total_steps // 4]
    return Trainer(opt, "backward", torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1))


def _exp_decay(model, c):
    opt = _sgd(model, c, **MOMENTUM)
    gamma = 0.01 ** (1.0 / max(1, c.total_steps))  # x0.01 over the run
    return Trainer(opt, "backward", torch.optim.lr_scheduler.ExponentialLR(opt, gamma))


def _sgdr(model, c):
    opt = _sgd(model, c, **MOMENTUM)
    period = max(1, c.total_steps // 3)  # three warm restarts' cycles
    return Trainer(
        opt, "backward", torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, period)
    )


def _schedule_free(model, c):
    import schedulefree

    return Trainer(schedulefree.SGDScheduleFree(model.parameters(), lr=c.lr, momentum=0.9), "sf")


def _schedule_free_adamw(model, c):
    import schedulefree

    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=c.lr, warmup_steps=WARMUP_STEPS,
                                         weight_decay=WEIGHT_DECAY)  # fmt: skip
    return Trainer(opt, "sf")


def _adamw(model: nn.Module, c: Context, lr: float | None = None) -> torch.optim.Optimizer:
    """torch's AdamW at the run's initial LR (or ``lr``, for a method that sets it itself)."""
    return torch.optim.AdamW(model.parameters(), lr=c.lr if lr is None else lr,
                             weight_decay=WEIGHT_DECAY)  # fmt: skip


def _warmup_cosine(model, c):
    """AdamW with the schedule language models are trained with: a linear warm-up over the first
    WARMUP_STEPS steps, then a cosine decay to 10% of the peak at the end of the run."""
    opt = _adamw(model, c)
    warmup = min(WARMUP_STEPS, max(1, c.total_steps // 10))
    decay = max(1, c.total_steps - warmup)

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / decay)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return Trainer(opt, "backward", torch.optim.lr_scheduler.LambdaLR(opt, scale))


def _prodigy(model, c):
    import prodigyopt

    return Trainer(prodigyopt.Prodigy(model.parameters(), lr=1.0), "backward")


def _dadapt(model, c):
    import dadaptation

    return Trainer(dadaptation.DAdaptAdam(model.parameters(), lr=1.0), "backward")


def _dog(model, c):
    import dog

    opt = dog.DoG(model.parameters(), lr=1.0)

    def lr() -> float:
        eta = opt.param_groups[0].get("eta")
        values = eta if isinstance(eta, list) else [eta]
        return float(torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).mean())

    return Trainer(opt, "backward", lr_fn=lr)


def _mechanic(model, c):
    from mechanic_pytorch import mechanize

    opt = mechanize(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9)

    def lr() -> float:  # the base LR times Mechanic's learned scale sum(s)
        s = opt.state.get("_mechanic", {}).get("s")
        scale = float(s.sum()) if isinstance(s, Tensor) else float("nan")
        return 0.01 * scale

    return Trainer(opt, "backward", lr_fn=lr)


def _marthe(model, c, hvp_fraction=None, *, hyper_lr, **kw):
    return Trainer(hx.MARTHE(model.parameters(), lr=c.lr, hyper_lr=c.beta(hyper_lr), **kw),
                   "closure", hvp_fraction=hvp_fraction)  # fmt: skip


def _hyper_lr(opt: torch.optim.Optimizer, hyper_lr: float) -> Trainer:
    """``opt`` with a HyperLR attached (its hooks run in ``opt.step()``); the LR reported is the
    one the last step applied, the schedule's scale times the learned LR."""
    hyper = hx.HyperLR(opt, hyper_lr=hyper_lr)
    return Trainer(opt, "backward", lr_fn=lambda: float(hyper.effective_lr[0].float().mean()))


METHODS: tuple[Method, ...] = (
    # ---- what people use: fixed LR, schedules, Adam
    Method("SGD", "baseline", SGD_LRS, lambda m, c: Trainer(_sgd(m, c, **MOMENTUM), "backward"),
           "torch.optim.SGD(momentum=0.9)"),
    Method("SGD step decay", "baseline", SGD_LRS, _step_decay, "x0.1 at 50% and 75% of the run"),
    Method("SGD exp decay", "baseline", SGD_LRS, _exp_decay, "x0.01 over the run"),
    Method("SGDR", "baseline", SGD_LRS, _sgdr, "cosine with warm restarts, 3 cycles"),
    Method("Adam", "baseline", ADAM_LRS,
           lambda m, c: Trainer(torch.optim.Adam(m.parameters(), lr=c.lr), "backward"), ""),
    Method("AdamW", "baseline", ADAM_LRS, lambda m, c: Trainer(_adamw(m, c), "backward"),
           f"weight_decay={WEIGHT_DECAY}", LM_ONLY),
    Method("AdamW warm-up + cosine", "baseline", ADAM_LRS, _warmup_cosine,
           f"linear warm-up over {WARMUP_STEPS} steps, cosine to 10% at the end", LM_ONLY),
    # ---- hypergradient descent (HD)
    Method("SGD-HD", "HD", SGD_LRS,
           lambda m, c: Trainer(hx.SGDHD(m.parameters(), lr=c.lr, hyper_lr=c.beta(1e-3)),
                                "backward"),
           "hyper_lr=1e-3 (Baydin)"),
    Method("SGDN-HD", "HD", SGD_LRS,
           lambda m, c: Trainer(hx.SGDHD(m.parameters(), lr=c.lr, hyper_lr=c.beta(1e-3),
                                         **NESTEROV),
                                "backward"), "Nesterov 0.9, hyper_lr=1e-3"),
    Method("Adam-HD", "HD", ADAM_LRS,
           lambda m, c: Trainer(hx.AdamHD(m.parameters(), lr=c.lr, hyper_lr=c.beta(1e-6)),
                                "backward"),
           "hyper_lr=1e-6"),
    Method("Adam-HD (mult)", "HD", ADAM_LRS,
           lambda m, c: Trainer(hx.AdamHD(m.parameters(), lr=c.lr, hyper_lr=c.beta(2e-2),
                                          multiplicative=True), "backward"),
           "multiplicative, hyper_lr=2e-2"),
    Method("AdamW-HD", "HD", ADAM_LRS,
           lambda m, c: Trainer(hx.AdamHD(m.parameters(), lr=c.lr, hyper_lr=c.beta(1e-6),
                                          weight_decay=WEIGHT_DECAY,
                                          decoupled_weight_decay=True), "backward"),
           f"decoupled weight_decay={WEIGHT_DECAY}, hyper_lr=1e-6", LM_ONLY),
    Method("AdamW-HD (mult)", "HD", ADAM_LRS,
           lambda m, c: Trainer(hx.AdamHD(m.parameters(), lr=c.lr, hyper_lr=c.beta(2e-2),
                                          multiplicative=True, weight_decay=WEIGHT_DECAY,
                                          decoupled_weight_decay=True), "backward"),
           f"multiplicative, decoupled weight_decay={WEIGHT_DECAY}, hyper_lr=2e-2", LM_ONLY),
    Method("First-order (Val)", "HD", SGD_LRS,
           lambda m, c: Trainer(hx.SGDHD(m.parameters(), lr=c.lr, hyper_lr=c.beta(1e-3),
                                         **NESTEROV),
                                "backward", val=True),
           "SGDN-HD on a validation loss (val_closure)"),
    # ---- the robust preset: hyper_optimizer="adam" (an Adam step on log eta), every other
    # hyper-argument its default (chosen on the training tasks only: benchmarks/preset.py)
    Method("SGD-HD robust", "HD", SGD_LRS,
           lambda m, c: Trainer(hx.SGDHD(m.parameters(), lr=c.lr, hyper_optimizer="adam",
                                         hyper_lr=c.beta(ROBUST_ALPHA), **MOMENTUM), "backward"),
           "momentum 0.9, hyper_optimizer='adam' (the robust preset)"),
    Method("Adam-HD robust", "HD", ADAM_LRS,
           lambda m, c: Trainer(hx.AdamHD(m.parameters(), lr=c.lr, hyper_optimizer="adam",
                                          hyper_lr=c.beta(ROBUST_ALPHA)), "backward"),
           "hyper_optimizer='adam' (the robust preset)"),
    Method("AdamW-HD robust", "HD", ADAM_LRS,
           lambda m, c: Trainer(hx.AdamHD(m.parameters(), lr=c.lr, hyper_optimizer="adam",
                                          hyper_lr=c.beta(ROBUST_ALPHA),
                                          weight_decay=WEIGHT_DECAY,
                                          decoupled_weight_decay=True), "backward"),
           f"decoupled weight_decay={WEIGHT_DECAY}, hyper_optimizer='adam' (the robust preset)",
           LM_ONLY),
    # ---- HD around torch's optimizers: HyperLR, with the hyper-LR of the HD method of the family
    Method("SGD+HyperLR", "HD", SGD_LRS,
           lambda m, c: _hyper_lr(_sgd(m, c, **MOMENTUM), c.beta(1e-3)),
           "torch.optim.SGD(momentum=0.9) in HyperLR, hyper_lr=1e-3"),
    Method("AdamW+HyperLR", "HD", ADAM_LRS,
           lambda m, c: _hyper_lr(_adamw(m, c), c.beta(1e-6)),
           f"torch.optim.AdamW (weight_decay={WEIGHT_DECAY}) in HyperLR, hyper_lr=1e-6",
           EVERY_MODEL),
    # ---- tangent (forward-mode) hypergradients
    Method("RTHO", "tangent", SGD_LRS,
           lambda m, c: Trainer(hx.RTHO(m.parameters(), lr=c.lr, hyper_lr=c.beta(1e-5),
                                        **MOMENTUM),
                                "closure"), "momentum 0.9, hyper_lr=1e-5"),
    Method("RT-HPO", "tangent", SGD_LRS,
           lambda m, c: Trainer(hx.RTHO(m.parameters(), lr=c.lr, hyper_lr=c.beta(1e-5),
                                        **MOMENTUM),
                                "closure", val=True), "RTHO on a validation loss"),
    Method("MARTHE", "tangent", SGD_LRS, lambda m, c: _marthe(m, c, **MARTHE_SETTINGS),
           "adaptive mu and beta, beta_0=1e-5, beta'=1e-6, momentum 0.9"),
    Method("MARTHE (AdamW)", "tangent", ADAM_LRS,
           lambda m, c: _marthe(m, c, inner="adamw", weight_decay=WEIGHT_DECAY, hyper_lr=1e-6,
                                hyper_hyper_lr=1e-8, hvp="forward_difference"),
           f"AdamW inside (weight_decay={WEIGHT_DECAY}), adaptive mu and beta, beta_0=1e-6, "
           "beta'=1e-8; Hessian products by forward differences (torch's CPU attention kernel "
           "has no double backward)", LM_ONLY),
    # ---- schedulers that learn the LR
    Method("TLR", "scheduler", SGD_LRS,
           lambda m, c: (lambda o: Trainer(o, "backward", hx.TLR(
               o, steps_per_epoch=c.steps_per_epoch)))(_sgd(m, c)),
           "plain SGD inside (its derivation's setting), gamma=0.33, p=0.2"),
    Method("TLR (AdamW)", "scheduler", ADAM_LRS,
           lambda m, c: (lambda o: Trainer(o, "backward", hx.TLR(
               o, steps_per_epoch=c.steps_per_epoch)))(_adamw(m, c)),
           "AdamW inside, gamma=0.33, p=0.2", LM_ONLY),
    Method("MLR-SNet", "scheduler", None,
           lambda m, c: (lambda o: Trainer(o, "mlr", hx.MLRSNet(
               o, meta_every=max(1, c.steps_per_epoch // 2))))(_sgd(m, c, **MOMENTUM)),
           "meta-trained online, twice per epoch"),
    Method("MLR-SNet (AdamW)", "scheduler", None,
           lambda m, c: (lambda o: Trainer(o, "mlr", hx.MLRSNet(
               o, meta_every=max(1, c.steps_per_epoch // 10))))(_adamw(m, c, lr=1e-3)),
           "AdamW inside (its LR set by the net from the first step), meta-trained online "
           "ten times per epoch", LM_ONLY),
    Method("MLR-SNet (pretrained)", "scheduler", None,
           lambda m, c: (lambda o: Trainer(o, "mlr", hx.MLRSNet.from_pretrained(
               o, "mnist-mlp")))(_sgd(m, c, **MOMENTUM)), "the shipped mnist-mlp net, frozen"),
    # ---- learning-rate-free optimizers (PyPI)
    Method("Schedule-Free SGD", "LR-free", SGD_LRS, _schedule_free, "schedulefree, momentum 0.9"),
    Method("Schedule-Free AdamW", "LR-free", ADAM_LRS, _schedule_free_adamw,
           f"schedulefree, warm-up {WARMUP_STEPS} steps, weight_decay={WEIGHT_DECAY}", LM_ONLY),
    Method("Adadelta", "LR-free", None,
           lambda m, c: Trainer(torch.optim.Adadelta(m.parameters()), "backward"),
           "torch.optim.Adadelta with its defaults (lr=1, rho=0.9), as in RT-HPO's Table 1",
           EVERY_MODEL),
    Method("Prodigy", "LR-free", None, _prodigy, "prodigyopt, lr=1", EVERY_MODEL),
    Method("D-Adapt Adam", "LR-free", None, _dadapt, "dadaptation, lr=1", EVERY_MODEL),
    Method("DoG", "LR-free", None, _dog, "dog-optimizer, lr=1", EVERY_MODEL),
    Method("Mechanic SGD", "LR-free", None, _mechanic, "mechanic-pytorch on SGD(lr=0.01, m=0.9)"),
)  # fmt: skip
METHOD_NAMES = tuple(m.name for m in METHODS)

# MARTHE with amortised Hessian products (the "marthe" experiment's cost/accuracy study): the
# settings of the MARTHE row above, the product every k-th step or on part of the batch.
AMORTISED_SETTINGS: dict[str, dict[str, Any]] = {
    "HVP every 2": dict(hvp_every=2),
    "HVP every 4": dict(hvp_every=4),
    "HVP every 8": dict(hvp_every=8),
    "HVP on 1/4 batch": dict(hvp_fraction=0.25),
    "forward difference": dict(hvp="forward_difference"),
}
AMORTISED: tuple[Method, ...] = tuple(
    Method(f"MARTHE ({label})", "tangent", SGD_LRS,
           lambda m, c, kw=kw: _marthe(m, c, **MARTHE_SETTINGS, **kw), label)
    for label, kw in AMORTISED_SETTINGS.items()
)  # fmt: skip
AMORTISED_NAMES = tuple(m.name for m in AMORTISED)


# Candidates for the robust preset (hyper_optimizer="adam", benchmarks/preset.py): Adam's step
# size on log eta and how a run begins (a linear warm-up of the applied LR over the first steps,
# during which log eta already moves). Chosen on the training tasks only.
PRESET_ALPHAS = (0.03, 0.1, 0.3)
PRESET_WARMUPS = (0, 10, 30)


def _preset_candidate(cls, alpha: float, warmup: int, **kw: Any):
    def build(model: nn.Module, c: Context) -> Trainer:
        opt = cls(model.parameters(), lr=c.lr, hyper_optimizer="adam",
                  hyper_lr=c.beta(alpha), lr_warmup=warmup, **kw)  # fmt: skip
        return Trainer(opt, "backward")

    return build


PRESET_CANDIDATES: tuple[Method, ...] = tuple(
    Method(f"{label} log-Adam a={alpha:g} w={warmup}", "HD", lrs,
           _preset_candidate(cls, alpha, warmup, **kw),
           f"hyper_optimizer='adam', hyper_lr={alpha:g}, warm-up {warmup} steps")
    for label, cls, lrs, kw in (("SGD-HD", hx.SGDHD, SGD_LRS, MOMENTUM),
                                ("Adam-HD", hx.AdamHD, ADAM_LRS, {}))
    for alpha in PRESET_ALPHAS
    for warmup in PRESET_WARMUPS
)  # fmt: skip
PRESET_CANDIDATE_NAMES = tuple(m.name for m in PRESET_CANDIDATES)


def method(name: str) -> Method:
    for m in METHODS + AMORTISED + PRESET_CANDIDATES:
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}; known: {METHOD_NAMES + AMORTISED_NAMES}")
