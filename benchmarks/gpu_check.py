"""The one-command GPU check (``make gpu-check``), for a machine with a CUDA GPU.

1. the compiled extension has its CUDA kernels (``make gpu-check`` builds it first);
2. ``pytest -m gpu``: every GPU test;
3. compute-sanitizer (memcheck, racecheck, synccheck) over tests/cuda_kernel_driver.py, which
   runs every CUDA kernel in every mode and dtype and compares it with the CPU kernel;
4. step time of the fused and foreach optimizers against torch's at 10M parameters in 100
   tensors and 100M in 300: a steady loop of one optimizer (CUDA events around 20 steps after
   5 warm-up steps), with the achieved bandwidth (minimal bytes per element, docs/design.md)
   against the measured device-to-device copy bandwidth.

Writes ``benchmarks/results/gpu_check.{md,json}`` (device, torch version, date) and exits non-zero
when a step failed.

    python -m benchmarks.gpu_check [--skip-tests] [--skip-sanitizer] [--sizes 10M:100,100M:300]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.overhead import variants
from benchmarks.timing import copy_bandwidth

ROOT = Path(__file__).resolve().parent.parent
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
# The fused (our kernels) and foreach paths, against torch's fused and foreach step.
IMPLS = ("fused", "foreach")


def find_compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, in the CUDA toolkit, or in the nvidia-cuda-sanitizer-api wheel."""
    candidates = [shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"]
    for site in sys.path:
        candidates += [str(p) for p in Path(site).glob("nvidia/*/bin/compute-sanitizer")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def run_step(name: str, command: list[str], timeout_s: int) -> dict[str, Any]:
    """Runs one command; its result row: name, command, passed, seconds, the output's tail."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        passed, output = done.returncode == 0, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        passed, output = False, f"timed out after {timeout_s} s\n{expired.stdout or ''}"
    row = {"step": name, "command": " ".join(command), "passed": passed,
           "seconds": round(time.perf_counter() - start, 1),
           "tail": "\n".join(output.strip().splitlines()[-15:])}  # fmt: skip
    print(f"gpu-check: {name}: {'passed' if passed else 'FAILED'} ({row['seconds']} s)", flush=True)
    return row


def steady_step_ms(optimizer: torch.optim.Optimizer, warmup: int = 5, steps: int = 20) -> float:
    """Median-free steady loop: the mean step time of `steps` consecutive steps (CUDA events)."""
    for _ in range(warmup):
        optimizer.step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        optimizer.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def time_steps(total: int, count: int) -> list[dict[str, Any]]:
    """Step time of every fused/foreach variant of benchmarks.overhead on `count` CUDA tensors."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = [total // count + (i < total % count) for i in range(count)]
    params = [torch.zeros(n, device=device, requires_grad=True) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    rows = []
    for v in variants():
        if v.impl not in IMPLS:
            continue
        row: dict[str, Any] = {"total_params": total, "n_tensors": count, "variant": v.name,
                               "impl": v.impl, "family": v.family}  # fmt: skip
        try:
            optimizer = v.make(params)
            row["ms"] = steady_step_ms(optimizer)
            row["gb_per_s"] = total * 4 * v.bytes_per_elem / (row["ms"] / 1e3) / 1e9
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as error:
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        rows.append(row)
        del optimizer
        gc.collect()
        torch.cuda.empty_cache()
    for row in rows:
        base_name = "torch SGD" if row["family"] == "sgd" else "torch Adam"
        base = next(r for r in rows if r["variant"] == base_name and r["impl"] == row["impl"])
        if "ms" in row and "ms" in base:
            row["ratio_vs_torch"] = row["ms"] / base["ms"]
    return rows


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    lines = [
        "# GPU check",
        "",
        f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}. "
        f"Produced by `make gpu-check` (benchmarks/gpu_check.py).",
        "",
        "| step | result | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {r['step']} | {'passed' if r['passed'] else '**FAILED**'} | {r['seconds']} |"
              for r in result["steps"]]  # fmt: skip
    if result.get("copy_bandwidth_gb_per_s"):
        lines += [
            "",
            f"Step time: a steady loop of one optimizer (mean of 20 steps after 5 warm-up steps, "
            f"CUDA events). Device-to-device copy: {result['copy_bandwidth_gb_per_s']:.0f} GB/s "
            "(bytes read + written); GB/s of a step counts its minimal bytes per element.",
            "",
            "| params | tensors | variant | impl | ms/step | GB/s | % of copy | vs torch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        copy_bw = result["copy_bandwidth_gb_per_s"]
        for r in result["timing"]:
            if "ms" not in r:
                lines.append(f"| {r['total_params']:,} | {r['n_tensors']} | {r['variant']} | "
                             f"{r['impl']} | {r.get('error', '')} | | | |")  # fmt: skip
                continue
            lines.append(
                f"| {r['total_params']:,} | {r['n_tensors']} | {r['variant']} | {r['impl']} | "
                f"{r['ms']:.3f} | {r['gb_per_s']:.0f} | {100 * r['gb_per_s'] / copy_bw:.0f}% | "
                f"{r.get('ratio_vs_torch', float('nan')):.2f}x |"
            )
    for r in result["steps"]:
        if not r["passed"]:
            lines += ["", f"## {r['step']}: output", "", "```", r["tail"], "```"]
    md_path.write_text("\n".join(lines) + "\n")
    return [json_path, md_path]


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        size, count = item.split(":")
        scale = 1e6 if size[-1] in "Mm" else 1
        pairs.append((int(float(size.rstrip("Mm")) * scale), int(count)))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-tests", action="store_true", help="no pytest -m gpu")
    parser.add_argument("--skip-sanitizer", action="store_true", help="no compute-sanitizer")
    parser.add_argument("--sizes", type=_parse_sizes, default=_parse_sizes("10M:100,100M:300"),
                        help="total params:tensors pairs to time")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    from hyperlr_ext import _ops

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device")
        return 2
    result: dict[str, Any] = {
        "environment": {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "date": datetime.date.today().isoformat(),
            "python": sys.version.split()[0],
        },
        "steps": [],
    }
    compiled = bool(_ops.CUDA_COMPILED)
    result["steps"].append({"step": "extension has its CUDA kernels", "command": "import",
                            "passed": compiled, "seconds": 0.0,
                            "tail": str(_ops.EXTENSION_ERROR or "")})  # fmt: skip
    if not args.skip_tests:
        result["steps"].append(
            run_step(
                "pytest -m gpu",
                [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                240,
            )  # fmt: skip
        )
    if not args.skip_sanitizer:
        sanitizer = find_compute_sanitizer()
        for tool in SANITIZER_TOOLS:
            if sanitizer is None:
                result["steps"].append({"step": f"compute-sanitizer {tool}", "command": "",
                                        "passed": False, "seconds": 0.0,
                                        "tail": "compute-sanitizer not found"})  # fmt: skip
                continue
            command = [sanitizer, "--tool", tool, "--error-exitcode", "1",
                       sys.executable, "tests/cuda_kernel_driver.py"]  # fmt: skip
            result["steps"].append(run_step(f"compute-sanitizer {tool}", command, 300))
    if compiled:
        result["copy_bandwidth_gb_per_s"] = copy_bandwidth(100_000_000, torch.device("cuda"))
        result["timing"] = []
        for total, count in args.sizes:
            result["timing"] += time_steps(total, count)
            print(f"gpu-check: timed {total:,} parameters in {count} tensors", flush=True)
    for path in write_report(result, args.out):
        print(f"wrote {path}")
    return 0 if all(r["passed"] for r in result["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
