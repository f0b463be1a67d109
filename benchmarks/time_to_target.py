"""Time to target (AlgoPerf's measure) over the robustness study's runs, and the performance
profile across tasks.

Each run records its validation metric (the task's first ``val_examples`` validation examples)
at its log points, with the training steps and seconds spent so far (evaluation excluded). A
task's target is what its time reference (torch SGD with momentum, AdamW for the language
model) reaches at the end at its best initial LR, mean of the seeds, relaxed by ``SLACK``
(accuracy times 0.99, loss times 1.02). A method's time to target on a task is taken at its
best initial LR (what tuning gets; the methods without an LR have one run per seed): the
median over the seeds that reach the target, and "not reached" unless most seeds do. The
performance profile gives, for every method, the fraction of tasks on which it reaches the
target within tau times the fastest method's time.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.robustness import TASKS, BenchConfig, same_lr, time_reference

SLACK = {"accuracy": 0.99, "loss": 1.02}
TAUS = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)


def _reached(value: float, target: float, metric: str) -> bool:
    if not math.isfinite(value):
        return False
    return value >= target if metric == "accuracy" else value <= target


def targets(results: list[dict[str, Any]], rows: list[dict[str, Any]],
            cfg: BenchConfig) -> dict[str, float]:  # fmt: skip
    """Per task: the final validation metric of its time reference at its best initial LR (mean
    of the seeds), relaxed by SLACK."""
    out = {}
    for task in cfg.tasks:
        reference = time_reference(task)
        row = next((r for r in rows if r["task"] == task and r["method"] == reference), None)
        if row is None:
            continue
        finals = [r["val"][-1] for r in results if r["task"] == task
                  and r["method"] == reference and same_lr(r["lr0"], row["best"]["lr0"])
                  and r.get("val")]  # fmt: skip
        finite = [v for v in finals if math.isfinite(v)]
        if finite:
            out[task] = statistics.fmean(finite) * SLACK[TASKS[task].metric]
    return out


def times_to_target(results: list[dict[str, Any]], rows: list[dict[str, Any]],
                    cfg: BenchConfig) -> list[dict[str, Any]]:  # fmt: skip
    """Per task and method (at its best initial LR): seeds that reach the target, and the
    median steps and seconds to it over those seeds (None when most seeds do not)."""
    goal = targets(results, rows, cfg)
    out = []
    for row in rows:
        task = row["task"]
        if task not in goal:
            continue
        metric = TASKS[task].metric
        runs = [r for r in results if r["task"] == task and r["method"] == row["method"]
                and same_lr(r["lr0"], row["best"]["lr0"]) and "val" in r]  # fmt: skip
        hits = []
        for r in runs:
            first = next((i for i, v in enumerate(r["val"]) if _reached(v, goal[task], metric)),
                         None)  # fmt: skip
            if first is not None:
                hits.append((r["val_steps"][first], r["val_seconds"][first]))
        reached = 2 * len(hits) > len(runs)
        out.append({
            "task": task, "method": row["method"], "lr0": row["best"]["lr0"],
            "target": goal[task], "seeds": len(runs), "reached": len(hits),
            "steps": statistics.median(h[0] for h in hits) if reached else None,
            "seconds": statistics.median(h[1] for h in hits) if reached else None,
        })  # fmt: skip
    return out


def profile(times: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per method: for each tau of TAUS, the fraction of tasks on which its seconds to target
    are within tau times the fastest method's on that task (not reached: never)."""
    tasks = sorted({t["task"] for t in times})
    fastest = {}
    for task in tasks:
        done = [t["seconds"] for t in times if t["task"] == task and t["seconds"] is not None]
        if done:
            fastest[task] = min(done)
    out = {}
    for name in dict.fromkeys(t["method"] for t in times):
        ratios = []
        for task in fastest:
            mine = next((t for t in times if t["task"] == task and t["method"] == name), None)
            seconds = None if mine is None else mine["seconds"]
            ratios.append(math.inf if seconds is None else seconds / fastest[task])
        out[name] = [sum(r <= tau for r in ratios) / len(fastest) for tau in TAUS]
    return out


def markdown(times: list[dict[str, Any]]) -> str:
    """The report section: per task, each method's steps and seconds to the target."""
    lines = [
        "Time to target, AlgoPerf's measure: a task's target is its time reference's final "
        "validation metric (torch SGD with momentum 0.9; AdamW on the language model) at its "
        f"best initial LR, relaxed (accuracy × {SLACK['accuracy']}, loss × {SLACK['loss']}); "
        "each method at its own best initial LR, the median over the seeds that reach it "
        '("not reached" unless most seeds do); seconds of training, evaluation excluded.',
    ]
    for task in dict.fromkeys(t["task"] for t in times):
        mine = [t for t in times if t["task"] == task]
        target = mine[0]["target"]
        label = "held-out loss ≤" if TASKS[task].metric == "loss" else "accuracy ≥"
        lines += ["", f"#### {task} (validation {label} {target:.3f})", "",
                  "| method | lr0 | seeds reaching | steps | seconds |",
                  "|---|---|---|---|---|"]  # fmt: skip
        order = sorted(mine, key=lambda t: math.inf if t["seconds"] is None else t["seconds"])
        for t in order:
            lr = "—" if math.isnan(t["lr0"]) else f"{t['lr0']:g}"
            if t["seconds"] is None:
                cells = "not reached | —"
            else:
                cells = f"{t['steps']:.0f} | {t['seconds']:.2f}"
            lines.append(f"| {t['method']} | {lr} | {t['reached']}/{t['seeds']} | {cells} |")
    lines += ["", "![performance profile](report_profile.png)"]
    return "\n".join(lines) + "\n"


def plot_profile(times: list[dict[str, Any]], out_dir: Path) -> Path:
    """The performance profile: fraction of tasks reached within tau x the fastest, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (name, fractions) in enumerate(profile(times).items()):
        style = "-" if k < 10 else "--" if k < 20 else ":"
        ax.step(TAUS, fractions, where="post", linestyle=style, color=f"C{k % 10}",
                linewidth=1, label=name)  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tau: time to target / the fastest method's on the task")
    ax.set_ylabel("fraction of tasks")
    ax.set_title("Performance profile (time to target at each method's best initial LR)")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    path = out_dir / "report_profile.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
