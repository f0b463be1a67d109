"""``python -m benchmarks``: the main benchmark and its report (``make bench``).

Runs, in order: the robustness study of every method against tuned and learning-rate-free
baselines (``report.md``), the toy functions of the MARTHE paper, TLR and MLR-SNet against
hand-designed schedules, the optimizer-step overhead, MARTHE/RTHO's training-step overhead and
MARTHE's amortised Hessian products (cost against accuracy), and the hyper-LR (beta) axis of the
HD and tangent methods;
then writes ``benchmarks/results/report.md`` (+ JSON and PNGs) with the overhead sections and
refreshes README.md's headline table. Embedded data only: no download.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import (
    beta_axis,
    marthe_amortised,
    marthe_overhead,
    overhead,
    robustness,
    schedulers,
    toys,
)
from benchmarks.overhead_report import write_overhead
from benchmarks.pool import default_workers
from benchmarks.report import environment, write_report

RESULTS = Path(__file__).parent / "results"
EXPERIMENTS = ("robustness", "toys", "schedulers", "overhead", "marthe")
# The overhead configurations (total parameters, tensors) of the default run (the README's
# columns; the steady loop runs at 10M x 100 too); --full times every size x count.
OVERHEAD_DEFAULT = ((1_000_000, 10), (10_000_000, 100), (10_000_000, 1000))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--only",
        choices=EXPERIMENTS,
        action="append",
        help="run only this experiment (repeatable; default: all). robustness: every method "
        "over initial LRs and seeds; toys: Beale/Bukin; schedulers: TLR and MLR-SNet; "
        "overhead: optimizer step time; marthe: MARTHE/RTHO training-step overhead and the "
        "cost/accuracy of amortised Hessian products",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="tiny configuration for smoke tests (~1 minute); writes to results/quick/",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="paper-scale robustness study (every task, 5 seeds, 4x the epochs) and every "
        "overhead configuration (hours on a CPU)",
    )
    parser.add_argument("--out", type=Path, help=f"output directory (default {RESULTS})")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="ignore the cache of finished runs (benchmarks/.cache/) and start over",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--workers",
        type=int,
        help="training runs at once, each in its own process with an equal share of the cores "
        "(default: one per core, at most 4, on the CPU; 1 on a GPU)",
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = default_workers(args.device)
    elif args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    return args


def _config(args: argparse.Namespace) -> robustness.BenchConfig:
    if args.quick:
        return robustness.QUICK
    return robustness.FULL if args.full else robustness.DEFAULT


def _training_runs(cfg: robustness.BenchConfig, selected: set[str]) -> list[tuple]:
    """The runs the selected studies train: the amortised MARTHE study's, the robustness
    study's and the beta axis's (shared runs once)."""
    runs: list[tuple] = []
    if "marthe" in selected:
        runs += robustness.run_list(robustness.amortised(cfg))
    if "robustness" in selected:
        runs += robustness.run_list(cfg) + beta_axis.beta_runs(cfg)
    unique: dict[str, tuple] = {}  # keyed by text: the LR-free methods' LR is NaN
    for run in map(robustness.unpack_run, runs):
        unique.setdefault(repr(run), run)
    return list(unique.values())


def main(argv: list[str] | None = None) -> None:
    """Run the selected experiments and write JSON, markdown and PNGs under ``--out``."""
    args = parse_args(argv)
    selected = set(args.only or EXPERIMENTS)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu" and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other work "
            "is running, CPU timings will be noisy",
            file=sys.stderr,
        )
    start = time.perf_counter()
    written: list[Path] = []
    if "toys" in selected:
        result = toys.run_toys(steps=50 if args.quick else toys.STEPS, workers=args.workers)
        written += toys.write_toys(result, args.out)
    if "schedulers" in selected:
        cfg = schedulers.QUICK if args.quick else schedulers.SchedulerConfig()
        written += schedulers.write_schedulers(schedulers.run_schedulers(cfg, args.workers),
                                               args.out)  # fmt: skip
    # Every training run of the studies below, in one pool of workers before the timed
    # sections (the studies then read them from the cache).
    runs = _training_runs(_config(args), selected)
    if runs:
        robustness.run_benchmark(_config(args), args.device, fresh=args.fresh,
                                 progress=not args.no_progress, runs=runs,
                                 workers=args.workers)  # fmt: skip
    if "overhead" in selected:
        if args.quick:
            result = overhead.run_overhead(
                args.device, sizes=(1_000_000,), counts=(10, 1000), min_time_s=0.3
            )
        else:
            every = [(size, count) for size in overhead.SIZES for count in overhead.COUNTS]
            skip = () if args.full else tuple(c for c in every if c not in OVERHEAD_DEFAULT)
            result = overhead.run_overhead(args.device, skip=skip)
        written += write_overhead(result, args.out)
    if "marthe" in selected:
        cfg = marthe_overhead.QUICK if args.quick else marthe_overhead.MartheConfig()
        result = marthe_overhead.run_marthe_overhead(cfg)
        written += marthe_overhead.write_marthe_overhead(result, args.out)
        study = marthe_amortised.run_amortised(
            _config(args), args.device, progress=not args.no_progress, workers=args.workers
        )
        written += marthe_amortised.write_amortised(study, environment(args.device), args.out)
    if "robustness" in selected:
        cfg = _config(args)
        results = robustness.run_benchmark(
            cfg, args.device, progress=not args.no_progress, workers=args.workers
        )
        beta = beta_axis.run_beta_axis(
            cfg, args.device, progress=not args.no_progress, workers=args.workers
        )
        written += beta_axis.write_beta_axis(beta, args.out)
        sections = _overhead_sections(args.out)
        written += write_report(
            results, cfg, args.device, args.out, sections,
            update_readme=not args.quick and args.out == RESULTS,
        )  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    print(f"benchmarks finished in {time.perf_counter() - start:.0f} s")


def _overhead_sections(out: Path) -> list[str]:
    """The overhead results present in ``out``, as report sections (headings demoted)."""
    sections = []
    for name in ("beta_axis.md", "overhead_cpu.md", "overhead_cuda.md", "marthe_overhead.md",
                 "marthe_amortised.md", "toys.md", "schedulers.md"):  # fmt: skip
        path = out / name
        if path.is_file():
            text = path.read_text().replace("\n#", "\n##")
            sections.append("#" + text if text.startswith("#") else text)
    return sections


if __name__ == "__main__":
    main()
