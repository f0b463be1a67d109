"""The beta axis of the robustness study: how sensitive each HD and tangent method is to its
hyper-LR, beside how sensitive it is to its initial LR.

Every method of family "HD" or "tangent" that trains the task runs at one fixed initial LR (the
second point of its grid: 1e-2 for the SGD family, 1e-3 for the Adam family) with its hyper-LR
(beta; for MARTHE beta_0) multiplied by 0.1, 1, 10 and 100: three decades around the value the
study fixes, the rest of the protocol (epochs, cache; the first two seeds) the robustness
study's. The
report gives, per method, the worst / best over the beta axis and, from the main study, over
the initial-LR axis, and a plot of the result against the scale.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.methods import method
from benchmarks.robustness import (
    CACHE,
    TASKS,
    BenchConfig,
    lr_grid,
    run_benchmark,
    summarise,
)

SCALES = (0.1, 1.0, 10.0, 100.0)
BETA_SEEDS = 2  # the axis runs the study's first two seeds (the budget of make bench)
BETA_TASKS = ("mnist-mlp", "text-gpt")  # an image classifier and the language model


def axis_methods(task: str, cfg: BenchConfig) -> list[str]:
    """The HD and tangent methods of ``cfg`` that train ``task``."""
    return [
        name for name in cfg.methods
        if method(name).family in ("HD", "tangent") and TASKS[task].model in method(name).models
    ]  # fmt: skip


def fixed_lr(name: str) -> float:
    """The initial LR of a method's beta axis: the second point of its grid."""
    return method(name).lrs[1]


def _tasks(cfg: BenchConfig) -> tuple[str, ...]:
    return tuple(t for t in cfg.tasks if t in BETA_TASKS) or cfg.tasks[:1]


def beta_runs(cfg: BenchConfig) -> list[tuple[str, str, float, int, float]]:
    """The runs of the beta axis: (task, method, its fixed initial LR, seed, hyper-LR scale)."""
    return [
        (task, name, fixed_lr(name), seed, scale)
        for task in _tasks(cfg)
        for name in axis_methods(task, cfg)
        for scale in SCALES
        for seed in cfg.seeds[:BETA_SEEDS]
    ]


def run_beta_axis(cfg: BenchConfig, device: str, cache_root: Path = CACHE, fresh: bool = False,
                  progress: bool = True, workers: int = 1) -> dict[str, Any]:  # fmt: skip
    """The beta-axis runs on the tasks of ``cfg`` among BETA_TASKS (the first task of ``cfg``
    when none is), and the initial-LR axis of the same methods from the main study."""
    tasks = _tasks(cfg)
    results = run_benchmark(cfg, device, cache_root, fresh=fresh, progress=progress,
                            runs=beta_runs(cfg), workers=workers)  # fmt: skip
    rows = []
    for task in tasks:
        metric = TASKS[task].metric
        sign = 1.0 if metric == "accuracy" else -1.0
        key = "test_accuracy" if metric == "accuracy" else "test_loss"
        for name in axis_methods(task, cfg):
            points = []
            for scale in SCALES:
                mine = [r for r in results if r["task"] == task and r["method"] == name
                        and r.get("hyper_scale", 1.0) == scale]  # fmt: skip
                points.append({"scale": scale, "score": sum(r[key] for r in mine) / len(mine),
                               "diverged": sum(r["diverged"] for r in mine)})  # fmt: skip
            rows.append({
                "task": task, "metric": metric, "method": name, "lr0": fixed_lr(name),
                "points": points,
                "best": max(points, key=lambda p: sign * p["score"]),
                "worst": min(points, key=lambda p: sign * p["score"]),
            })  # fmt: skip
    main = replace(cfg, tasks=tasks, methods=tuple(dict.fromkeys(r["method"] for r in rows)))
    main_rows = summarise(
        run_benchmark(main, device, cache_root, progress=progress, workers=workers), main
    )
    for row in rows:
        other = next(r for r in main_rows if r["task"] == row["task"]
                     and r["method"] == row["method"])  # fmt: skip
        row["lr_axis"] = {"worst": other["worst"]["score"], "best": other["best"]["score"],
                          "grid": list(lr_grid(method(row["method"]), cfg))}  # fmt: skip
    return {"scales": list(SCALES), "tasks": list(tasks), "seeds": list(cfg.seeds[:BETA_SEEDS]),
            "rows": rows}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# The beta axis: sensitivity to the hyper-LR beside the initial LR",
        "",
        f"Each HD and tangent method at a fixed initial LR (its grid's second point), its hyper-LR "
        f"times {', '.join(f'{s:g}' for s in result['scales'])} (three decades around the value "
        f"of the main study), {len(result['seeds'])} seeds, the robustness study's protocol. "
        "Worst / best of the seeds' mean over the beta axis, and over the initial-LR axis of the "
        "main study (its fixed beta); the task's metric (test accuracy, or held-out loss for "
        "the language model, lower is better).",
    ]
    for task in result["tasks"]:
        lines += ["", f"## {task}", "",
                  "| method | lr0 | beta × 0.1 … 100: worst / best | initial LR: worst / best "
                  "| per scale |", "|---|---|---|---|---|"]  # fmt: skip
        for r in result["rows"]:
            if r["task"] != task:
                continue
            per = "; ".join(f"×{p['scale']:g}: {p['score']:.3f}"
                            + (f" ({p['diverged']} div.)" if p["diverged"] else "")
                            for p in r["points"])  # fmt: skip
            lines.append(f"| {r['method']} | {r['lr0']:g} | **{r['worst']['score']:.3f}** / "
                         f"{r['best']['score']:.3f} | **{r['lr_axis']['worst']:.3f}** / "
                         f"{r['lr_axis']['best']:.3f} | {per} |")  # fmt: skip
    lines += ["", "![beta axis](beta_axis.png)"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for k, r in enumerate(r for r in result["rows"] if r["task"] == task):
            ax.plot([p["scale"] for p in r["points"]], [p["score"] for p in r["points"]], "o-",
                    markersize=3, linewidth=1, color=f"C{k % 10}", label=r["method"])  # fmt: skip
        loss = TASKS[task].metric == "loss"
        ax.set_xscale("log")
        ax.set_xlabel("hyper-LR / the main study's")
        ax.set_ylabel("held-out loss" if loss else "test accuracy")
        ax.set_title(f"{task}: the beta axis at a fixed initial LR", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "beta_axis.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_beta_axis(result: dict[str, Any], out_dir: Path) -> list[Path]:
    md, js = out_dir / "beta_axis.md", out_dir / "beta_axis.json"
    md.write_text(markdown(result))
    clean = json.loads(json.dumps(result), parse_constant=lambda c: None)
    js.write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")
    return [md, js, plot(result, out_dir)]
