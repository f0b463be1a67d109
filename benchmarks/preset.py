"""The choice of the robust preset (``hyper_optimizer="adam"``'s defaults): every candidate of
benchmarks/methods.py (PRESET_CANDIDATES: Adam's step size on log eta, with or without a warm-up
at the start) runs SGD-HD (momentum 0.9) and Adam-HD over the initial-LR grids on the training
tasks of the benchmark only, 3 seeds; the candidate with the best mean worst-case accuracy
(over tasks and both optimizers; ties: the best mean best-case) is the preset. The held-out
tasks (the CNN and the language model) never enter the choice; the main study evaluates the
chosen preset on them.

``python -m benchmarks.preset`` writes results/preset.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.methods import PRESET_CANDIDATE_NAMES, method
from benchmarks.pool import default_workers
from benchmarks.robustness import DEFAULT, run_benchmark, summarise

TRAINING_TASKS = ("mnist-logreg", "mnist-mlp")
RESULTS = Path(__file__).parent / "results"


def candidate_of(name: str) -> str:
    """The preset a method row tries: its name without the optimizer."""
    return name.split(" ", 1)[1]


def run_preset_search(device: str = "cpu", workers: int = 1, progress: bool = True) -> dict:
    cfg = replace(DEFAULT, tasks=TRAINING_TASKS, methods=PRESET_CANDIDATE_NAMES)
    rows = summarise(run_benchmark(cfg, device, progress=progress, workers=workers), cfg)
    by_candidate: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_candidate.setdefault(candidate_of(row["method"]), []).append(row)
    scores = []
    for candidate, mine in by_candidate.items():
        worst = statistics.fmean(r["worst"]["score"] for r in mine)
        best = statistics.fmean(r["best"]["score"] for r in mine)
        scores.append({"candidate": candidate, "mean_worst": worst, "mean_best": best,
                       "rows": [{"task": r["task"], "method": r["method"],
                                 "worst": r["worst"]["score"], "worst_lr": r["worst"]["lr0"],
                                 "best": r["best"]["score"]} for r in mine]})  # fmt: skip
    scores.sort(key=lambda s: (s["mean_worst"], s["mean_best"]), reverse=True)
    settings = {name: method(name).settings for name in PRESET_CANDIDATE_NAMES}
    return {"tasks": list(TRAINING_TASKS), "seeds": list(cfg.seeds), "scores": scores,
            "chosen": scores[0]["candidate"], "settings": settings}  # fmt: skip


def write_preset(result: dict, out: Path) -> list[Path]:
    lines = [
        "# The robust preset: chosen on the training tasks",
        "",
        f'Candidates for `hyper_optimizer="adam"`\'s defaults, each with SGD-HD (momentum 0.9) '
        f"and Adam-HD over their initial-LR grids on {', '.join(result['tasks'])} (the "
        f"training tasks; the CNN and the language model are held out), seeds "
        f"{result['seeds']}; ranked by the mean worst-case test accuracy over those four "
        "(task, optimizer) pairs, ties by the mean best case.",
        "",
        "| candidate | mean worst | mean best | worst per task and optimizer (its lr0) |",
        "|---|---|---|---|",
    ]
    for s in result["scores"]:
        detail = "; ".join(f"{r['task']} {r['method'].split(' ')[0]}: {r['worst']:.3f} "
                           f"({r['worst_lr']:g})" for r in s["rows"])  # fmt: skip
        mark = " **(chosen)**" if s["candidate"] == result["chosen"] else ""
        lines.append(f"| {s['candidate']}{mark} | {s['mean_worst']:.3f} | {s['mean_best']:.3f} "
                     f"| {detail} |")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "preset.md", out / "preset.json"
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps(result, indent=1) + "\n")
    return [md, js]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preset", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    workers = args.workers or default_workers(args.device)
    for path in write_preset(run_preset_search(args.device, workers), args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
