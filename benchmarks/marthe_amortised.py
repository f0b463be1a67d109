"""MARTHE with amortised Hessian products: what each setting costs and what it loses.

Two measurements, on the robustness study's MLP and CNN tasks:

- **cost and accuracy**: SGD, exact MARTHE and its amortised variants (benchmarks/methods.py,
  ``AMORTISED``) trained by the robustness study's protocol (same grid of initial LRs, seeds,
  epochs and cache): time per step relative to torch SGD's, and the worst / best test accuracy
  over the initial-LR grid;
- **hypergradient error**: along one trajectory (float64, RTHO: mu = 1, the longest tangent
  memory, beta = 0 so every setting sees the same weights), each setting's Delta_t against the
  exact one, which ``hvp_every=1`` gives (tests/test_marthe.py checks it against autograd
  through the unrolled trajectory): the median and 90th percentile of |Delta_t - exact_t| /
  |exact_t| and the fraction of steps whose sign agrees.

    python -m benchmarks --only marthe
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import hyperlr_ext as hx
from benchmarks.methods import AMORTISED_NAMES, AMORTISED_SETTINGS, BatchLoss, Context, method
from benchmarks.robustness import (
    CACHE,
    TASKS,
    BenchConfig,
    amortised,
    load_data,
    make_model,
    run_benchmark,
    summarise,
)
from benchmarks.timing import round_robin

# The target: a setting at <= 1.5x a plain SGD step whose worst case is within the seeds' spread
# of exact MARTHE's.
TARGET_TIME = 1.5
# The error study's settings: RTHO keyword arguments and the Hessian product's batch fraction.
EXACT = "exact (HVP every step)"
ERROR_SETTINGS: dict[str, dict[str, Any]] = {EXACT: {}, **AMORTISED_SETTINGS}
ERROR_LR, ERROR_STEPS, ERROR_MOMENTUM = 0.1, 100, 0.9
# The side-by-side step timing: rounds of one block of steps per method, at a middle LR.
ROUNDS, BLOCK, TIMING_LR = 6, 16, 0.1


def _kwargs_and_fraction(setting: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    kwargs = dict(setting)
    return kwargs, kwargs.pop("hvp_fraction", None)


def hypergradient_errors(task_name: str, device: str, steps: int = ERROR_STEPS) -> list[dict]:
    """Per setting: the error of Delta_t against the exact Delta_t over ``steps`` steps of RTHO
    (SGD momentum 0.9, lr 0.1, beta = 0) on the task's model, in float64."""
    task = TASKS[task_name]
    data = load_data(task.data, device)
    x_all, y_all = data["x_train"].double(), data["y_train"]
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x_all), generator=gen).to(x_all.device)
    batches = [order[i * task.batch_size : (i + 1) * task.batch_size] for i in range(steps)]
    deltas: dict[str, list[float]] = {}
    for label, setting in ERROR_SETTINGS.items():
        kwargs, fraction = _kwargs_and_fraction(setting)
        torch.manual_seed(0)
        model = make_model(task, data).to(device).double()
        opt = hx.RTHO(model.parameters(), lr=ERROR_LR, hyper_lr=0.0, momentum=ERROR_MOMENTUM,
                      **kwargs)  # fmt: skip
        history = []
        for idx in batches:
            loss = BatchLoss(model, x_all[idx], y_all[idx])
            opt.step(loss, hvp_closure=None if fraction is None else loss.head(fraction))
            history.append(float(opt.param_groups[0]["hypergrad"]))
        deltas[label] = history
    exact = deltas[EXACT]
    rows = []
    for label, got in deltas.items():
        pairs = [(g, e) for g, e in zip(got[2:], exact[2:]) if e != 0]
        errors = sorted(abs(g - e) / abs(e) for g, e in pairs)
        rows.append({
            "task": task_name, "setting": label, "steps": steps,
            "median": statistics.median(errors),
            "p90": errors[min(len(errors) - 1, int(0.9 * len(errors)))],
            "sign": sum((g > 0) == (e > 0) for g, e in pairs) / len(pairs),
        })  # fmt: skip
    return rows


def step_times(task_name: str, device: str, rounds: int = ROUNDS,
               block: int = BLOCK) -> dict[str, float]:  # fmt: skip
    """Seconds per training step of SGD, exact MARTHE and each amortised setting on the task's
    model and batches, measured side by side: ``rounds`` rounds of one block of ``block``
    consecutive steps per method (a multiple of every ``hvp_every``, so a block holds its share
    of product steps), after one warm-up block; the median block per method."""
    task = TASKS[task_name]
    data = load_data(task.data, device)
    names = ["SGD", "MARTHE", *AMORTISED_NAMES]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(data["x_train"]), (task.batch_size,), generator=gen)
               for _ in range(block)]  # fmt: skip
    context = Context(lr=TIMING_LR, steps_per_epoch=block, total_steps=block * (rounds + 1))
    trainers = {}
    for name in names:
        torch.manual_seed(0)
        model = make_model(task, data).to(device)
        trainers[name] = (model, method(name).build(model, context))

    def run_block(name: str) -> float:
        model, trainer = trainers[name]
        start = time.perf_counter()
        for idx in batches:
            loss = BatchLoss(model, data["x_train"][idx], data["y_train"][idx])
            trainer.step(loss, loss)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / block

    for name in names:  # the warm-up block
        run_block(name)
    blocks: dict[str, list[float]] = {name: [] for name in names}
    round_robin(lambda name: blocks[name].append(run_block(name)), names, min_rounds=rounds,
                max_rounds=rounds, min_time_s=0.0)  # fmt: skip
    return {name: statistics.median(times) for name, times in blocks.items()}


def run_amortised(cfg: BenchConfig, device: str, cache_root: Path = CACHE, fresh: bool = False,
                  progress: bool = True, workers: int = 1) -> dict[str, Any]:  # fmt: skip
    """The cost/accuracy study at ``cfg``'s scale (its runs cached with the robustness study's)
    and the error study."""
    study = amortised(cfg)
    results = run_benchmark(
        study, device, cache_root, fresh=fresh, progress=progress, workers=workers
    )
    quick = study.epoch_scale < 1
    errors = [
        row
        for task in study.tasks
        for row in hypergradient_errors(task, device, 10 if quick else ERROR_STEPS)
    ]
    summary = summarise(results, study)
    for task in study.tasks:
        times = step_times(task, device, rounds=1 if quick else ROUNDS)
        for row in summary:
            if row["task"] == task:
                row["time_in_runs_vs_sgd"] = row["time_vs_sgd"]
                row["time_vs_sgd"] = times[row["method"]] / times["SGD"]
                row["step_ms"] = 1e3 * times[row["method"]]
    return {"config": study.shared() | {"tasks": study.tasks, "seeds": study.seeds},
            "summary": summary, "errors": errors}  # fmt: skip


def _verdict(rows: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """Per task, the settings that meet the target; and whether one setting meets it on all."""
    lines, meeting = [], None
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = {r["method"]: r for r in rows if r["task"] == task}
        exact = mine["MARTHE"]["worst"]
        floor = exact["accuracy"] - exact["accuracy_std"]
        ok = [name for name, r in mine.items()
              if name.startswith("MARTHE (") and r["time_vs_sgd"] <= TARGET_TIME
              and r["worst"]["accuracy"] >= floor]  # fmt: skip
        meeting = set(ok) if meeting is None else meeting & set(ok)
        lines.append(f"- {task}: exact MARTHE's worst case {exact['accuracy']:.3f} ± "
                     f"{exact['accuracy_std']:.3f} at {mine['MARTHE']['time_vs_sgd']:.2f}× SGD; "
                     f"within its spread at ≤ {TARGET_TIME}×: "
                     f"{', '.join(ok) if ok else 'none'}.")  # fmt: skip
    met = bool(meeting)
    lines.append(f"- On every task: {', '.join(sorted(meeting)) if met else 'none'} "
                 f"(target {'met' if met else 'not met'}).")  # fmt: skip
    return lines, met


def markdown(result: dict[str, Any], env: dict[str, Any]) -> str:
    cfg = result["config"]
    out = [
        "# MARTHE with amortised Hessian products: cost and accuracy",
        "",
        f"{env['device_name']}, {env['cpu_count']} CPUs, torch {env['torch']}, hyperlr_ext "
        f"{env['hyperlr_ext']}, {env['date']}. The robustness study's protocol and runs "
        f"({len(cfg['seeds'])} seeds, the initial-LR grid of MARTHE's row, {cfg['epoch_scale']}× "
        f"the epochs): MARTHE with SGD momentum 0.9 inside, adaptive μ and β (β₀ = 1e-5, "
        "β′ = 1e-6). × SGD = time per step / torch SGD's (momentum 0.9) on the task's model "
        f"and batch size, timed side by side ({ROUNDS} rounds of {BLOCK} consecutive steps per "
        "setting, the median round; the training runs' own times, taken one run after "
        "another, drift too much between runs to compare settings); worst / best = mean test "
        "accuracy of the seeds at the worst / best initial LR (± their standard deviation at "
        "the worst).",
        "",
        "`HVP every k`: the Hessian product on every k-th step, the tangent propagated without "
        "the loss-Hessian term on the others (`hvp_every=k`); `HVP on 1/r batch`: the product of "
        "the loss on the batch's first 1/r (`hvp_closure`); `forward difference`: "
        '`hvp="forward_difference"`, one extra gradient at w + εZ against the step\'s own.',
        "",
    ]
    for task in cfg["tasks"]:
        out += [f"## {task}", "", "| setting | ms / step | × SGD step | worst | best |",
                "|---|---|---|---|---|"]  # fmt: skip
        for r in result["summary"]:
            if r["task"] != task:
                continue
            w, b = r["worst"], r["best"]
            div = f" ({w['diverged']} div.)" if w["diverged"] else ""
            out.append(f"| {r['method']} | {r['step_ms']:.2f} | {r['time_vs_sgd']:.2f}× | "
                       f"**{w['accuracy']:.3f}** ± {w['accuracy_std']:.3f}{div} | "
                       f"{b['accuracy']:.3f} |")  # fmt: skip
        out.append("")
    lines, _ = _verdict(result["summary"])
    out += ["## Target", "",
            f"A setting at ≤ {TARGET_TIME}× a torch SGD step whose worst case is at least exact "
            "MARTHE's minus the seeds' standard deviation there:", "", *lines, ""]  # fmt: skip
    out += [
        "## Hypergradient error",
        "",
        f"RTHO (μ = 1), SGD momentum {ERROR_MOMENTUM}, lr {ERROR_LR}, β = 0, float64, "
        f"{result['errors'][0]['steps']} steps from the same start on the same batches: every "
        "setting follows the same weights, and its Δ_t is compared with the exact one "
        "(`hvp_every=1`) at every step from the third: median and 90th percentile of "
        "|Δ_t − exact_t| / |exact_t|, and the share of steps whose sign agrees.",
        "",
        "| task | setting | median rel. error | 90th pct. | same sign |",
        "|---|---|---|---|---|",
    ]
    for r in result["errors"]:
        out.append(f"| {r['task']} | {r['setting']} | {r['median']:.2g} | {r['p90']:.2g} | "
                   f"{r['sign']:.0%} |")  # fmt: skip
    return "\n".join(out) + "\n"


def write_amortised(result: dict[str, Any], env: dict[str, Any], out_dir: Path) -> list[Path]:
    md, js = out_dir / "marthe_amortised.md", out_dir / "marthe_amortised.json"
    md.write_text(markdown(result, env))
    clean = json.loads(json.dumps(result, default=float), parse_constant=lambda c: None)
    js.write_text(json.dumps({"environment": env, **clean}, indent=1, allow_nan=False) + "\n")
    return [md, js]
