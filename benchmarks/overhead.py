"""Overhead benchmark: optimizer step time of SGDHD/AdamHD against torch.optim SGD/Adam, and of
torch's fused AdamW wrapped by HyperLR against the same AdamW alone.

For each total size (fp32 parameters) split into N equal tensors, every variant steps the same
parameters with the same fixed random gradients. Variants are timed round-robin (a few steps
each, again and again), so torch's baseline and ours are measured side by side under the same
machine load; the reported time is the median step. Achieved bandwidth counts the minimal bytes of
docs/design.md, "Kernel byte budgets" (reads + writes per element: torch SGD-momentum 5, Adam 7;
HD exact adds a second pass: SGD-HD exact reads/writes 6 (direction pass: g, b read, b written;
param pass: w, b read, w written), Adam-HD exact 9 (moments pass: g, m, v read, m, v written;
param pass: w, m, v read, w written); ``lr_lag=1`` is one pass with torch's own bytes; torch
AdamW 7 and HyperLR's pre-step pass 4 more (g, w, snapshot read, snapshot written): 11).

    python -m benchmarks.overhead --help
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.timing import (
    OtherLoad,
    Timer,
    copy_bandwidth,
    environment,
    round_robin,
    steady_loop,
)

SIZES = (1_000_000, 10_000_000, 50_000_000)
COUNTS = (10, 100, 1000)
STEADY = (10_000_000, 100)  # (total, count) of the steady-loop table
BASELINE = {"sgd": "torch SGD", "adam": "torch Adam", "adamw": "torch AdamW"}
FAMILIES = tuple(BASELINE)
# foreach and fused as asked for; the for-loop is what both torch and hyperlr_ext default to on CPU.
IMPLS: dict[str, dict[str, bool]] = {
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "for-loop": {"foreach": False},
}
# The implementations the AdamW family is timed with (torch's fused AdamW is the one HyperLR is
# meant to wrap; the others would add their round-robin time to every configuration), and the
# pass HyperLR is given for each: with "fused" its default, the compiled pass where that is the
# default on the device, else the for-loop (each row records the pass that ran).
HYPER_LR_IMPLS = ("fused",)
HYPER_LR_PASS: dict[str, dict[str, bool]] = {
    "foreach": {"foreach": True},
    "fused": {},
    "for-loop": {"foreach": False},
}


@dataclass(frozen=True)
class Variant:
    """One optimizer to time; ``impl`` is a key of ``IMPLS``; ``bytes_per_elem``: docs/design.md."""

    name: str
    family: str
    impl: str
    bytes_per_elem: int
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _with_hyper_lr(optimizer: torch.optim.Optimizer, **flags: bool) -> torch.optim.Optimizer:
    """``optimizer`` with a HyperLR attached (its hooks keep it alive); stepping the optimizer
    runs HyperLR's pre-step pass and rule."""
    import hyperlr_ext as hx

    hx.HyperLR(optimizer, hyper_lr=1e-14, **flags)
    return optimizer


def hyper_lr_pass(optimizer: torch.optim.Optimizer) -> str | None:
    """The pre-step pass ("fused", "foreach" or "single") of the HyperLR attached to
    ``optimizer``, None without one."""
    import hyperlr_ext as hx
    from hyperlr_ext._dispatch import choose_implementation

    hyper = hx.HyperLR.attached(optimizer)
    if hyper is None:
        return None
    params = optimizer.param_groups[0]["params"]
    return choose_implementation(
        params, foreach=hyper.foreach, fused=hyper.fused, algorithm="hyper_lr"
    )


def variants(families: tuple[str, ...] = FAMILIES) -> list[Variant]:
    """torch SGD(momentum=0.9)/Adam, SGDHD(momentum=0.9)/AdamHD exact and lr_lag=1, per ``IMPLS``;
    torch AdamW alone and with HyperLR, per ``HYPER_LR_IMPLS``; those of ``families``.

    The hyper-LRs are tiny so that weights stay finite over thousands of steps with a fixed
    gradient; the step does the same work whatever their value.
    """
    import hyperlr_ext as hx

    out = []
    for impl, flag in IMPLS.items():
        out += [
            Variant(
                "torch SGD",
                "sgd",
                impl,
                5,
                lambda p, f=flag: torch.optim.SGD(p, lr=1e-4, momentum=0.9, **f),
            ),
            Variant(
                "SGDHD",
                "sgd",
                impl,
                6,
                lambda p, f=flag: hx.SGDHD(p, lr=1e-4, hyper_lr=1e-14, momentum=0.9, **f),
            ),
            Variant(
                "SGDHD lag=1",
                "sgd",
                impl,
                5,
                lambda p, f=flag: hx.SGDHD(p, lr=1e-4, hyper_lr=1e-14, momentum=0.9, lr_lag=1, **f),
            ),
            Variant(
                "torch Adam", "adam", impl, 7, lambda p, f=flag: torch.optim.Adam(p, lr=1e-4, **f)
            ),
            Variant(
                "AdamHD",
                "adam",
                impl,
                9,
                lambda p, f=flag: hx.AdamHD(p, lr=1e-4, hyper_lr=1e-14, **f),
            ),
            Variant(
                "AdamHD lag=1",
                "adam",
                impl,
                7,
                lambda p, f=flag: hx.AdamHD(p, lr=1e-4, hyper_lr=1e-14, lr_lag=1, **f),
            ),
        ]
    for impl in HYPER_LR_IMPLS:
        flag, hyper = IMPLS[impl], HYPER_LR_PASS[impl]
        out += [
            Variant(
                "torch AdamW",
                "adamw",
                impl,
                7,
                lambda p, f=flag: torch.optim.AdamW(p, lr=1e-4, **f),
            ),
            Variant(
                "torch AdamW+HyperLR",
                "adamw",
                impl,
                11,
                lambda p, f=flag, h=hyper: _with_hyper_lr(torch.optim.AdamW(p, lr=1e-4, **f), **h),
            ),
        ]
    return [v for v in out if v.family in families]


def _minor_faults() -> int:
    """Minor page faults of this process so far (fresh memory touched: temporaries per step)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_round_robin(
    timed: list[tuple[dict[str, Any], torch.optim.Optimizer, list[float]]],
    timer: Timer,
    min_time_s: float,
    min_rounds: int,
    max_rounds: int,
) -> None:
    """Step every optimizer once per round, round after round, appending each step's time.

    Also counts the page faults of each step: an optimizer that allocates full-size temporaries
    every step pays for them here (the CPU allocator returns large blocks to the OS).
    """

    def step(index: int) -> None:
        row, optimizer, times = timed[index]
        faults = _minor_faults()
        times.append(timer(optimizer.step))
        row["page_faults"] = row.get("page_faults", 0) + _minor_faults() - faults

    # Every variant sees the same machine state.
    round_robin(step, range(len(timed)), min_rounds=min_rounds, max_rounds=max_rounds,
                min_time_s=min_time_s)  # fmt: skip


def time_config(
    total: int,
    count: int,
    device: torch.device,
    min_time_s: float,
    min_rounds: int = 5,
    max_rounds: int = 100,
    warmup: int = 1,
    families: tuple[str, ...] = FAMILIES,
) -> list[dict[str, Any]]:
    """Time every variant of ``families`` on ``count`` tensors holding ``total`` parameters; one
    row per variant.

    One family (SGD, Adam, AdamW) at a time, to hold only that family's optimizer states in
    memory.
    """
    params = _params(total, count, device)
    timer = Timer(device)
    rows: list[dict[str, Any]] = []
    for family in families:
        timed = []
        for v in variants((family,)):
            row = {"total_params": total, "n_tensors": count, "variant": v.name}
            row.update(family=family, impl=v.impl, bytes_per_elem=v.bytes_per_elem)
            rows.append(row)
            try:
                optimizer = v.make(params)
                for _ in range(warmup):  # allocates the state; HD's first step has h_0 = 0
                    optimizer.step()
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as error:
                row["unsupported"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                continue
            _record_hyper_lr_pass(row, optimizer)
            timed.append((row, optimizer, []))
        _time_round_robin(timed, timer, min_time_s, min_rounds, max_rounds)
        for row, _, times in timed:
            row["ms"] = 1e3 * statistics.median(times)
            row["ms_min"] = 1e3 * min(times)
            row["steps_timed"] = len(times)
            row["page_faults_per_step"] = row.pop("page_faults") / len(times)
            row["gb_per_s"] = total * 4 * row["bytes_per_elem"] / (row["ms"] / 1e3) / 1e9
        del timed
        gc.collect()
    _add_ratios(rows)
    return rows


def _record_hyper_lr_pass(row: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """A HyperLR row's ``hyper_lr_pass``: the implementation of the pre-step pass that ran."""
    chosen = hyper_lr_pass(optimizer)
    if chosen is not None:
        row["hyper_lr_pass"] = chosen


def _params(total: int, count: int, device: torch.device) -> list[torch.Tensor]:
    """``count`` zero fp32 tensors holding ``total`` parameters, with fixed N(0, 1) gradients."""
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = [total // count + (i < total % count) for i in range(count)]
    params = [torch.zeros(n, device=device, requires_grad=True) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen)
    return params


def _baseline(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any]:
    """torch's row with the same family and implementation."""
    return next(
        r for r in rows if r["variant"] == BASELINE[row["family"]] and r["impl"] == row["impl"]
    )


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each timed row's ``ratio_vs_torch``: its time over torch's with the same implementation."""
    for row in rows:
        base = _baseline(rows, row)
        if "ms" in row and "ms" in base:
            row["ratio_vs_torch"] = row["ms"] / base["ms"]


def steady_rows(
    total: int,
    count: int,
    device: torch.device,
    steps: int = 11,
    repeats: int = 3,
    families: tuple[str, ...] = FAMILIES,
) -> list[dict]:
    """Every variant of ``families`` timed in a steady loop (one optimizer stepped ``steps`` times
    in a row after warm-up, the median step: how a training loop runs it) on ``count`` tensors
    holding ``total`` parameters. The loops of the variants take turns ``repeats`` times; a row
    reports the median of its loops, and its ratio is the median over the turns of its loop over
    torch's loop of the same turn (a minute apart at most), so that the drift of a shared
    machine's memory bandwidth cancels."""
    params = _params(total, count, device)
    timer, rows, optimizers = Timer(device), [], []
    for v in variants(families):
        row = {"total_params": total, "n_tensors": count, "variant": v.name, "impl": v.impl,
               "family": v.family, "bytes_per_elem": v.bytes_per_elem, "loop_steps": steps,
               "loops_ms": []}  # fmt: skip
        rows.append(row)
        try:
            optimizer = v.make(params)
            optimizer.step()
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as error:
            row["unsupported"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        _record_hyper_lr_pass(row, optimizer)
        optimizers.append((row, optimizer))
    for _ in range(repeats):
        for row, optimizer in optimizers:
            row["loops_ms"].append(1e3 * steady_loop(optimizer.step, timer, steps=steps))
    for row, _ in optimizers:
        row["ms"] = statistics.median(row["loops_ms"])
    del optimizers
    gc.collect()
    for row in rows:
        base = _baseline(rows, row)
        if "ms" in row and "ms" in base:
            row["ratio_vs_torch"] = statistics.median(
                ours / theirs for ours, theirs in zip(row["loops_ms"], base["loops_ms"])
            )
    return rows


def run_overhead(
    device: str = "cpu",
    sizes: tuple[int, ...] = SIZES,
    counts: tuple[int, ...] = COUNTS,
    min_time_s: float = 1.5,
    skip: tuple[tuple[int, int], ...] = (),
    steady: tuple[int, int] | None = STEADY,
    families: tuple[str, ...] = FAMILIES,
) -> dict[str, Any]:
    """Time the variants of ``families`` on every (size, count) configuration not in ``skip``
    round-robin and on the ``steady`` configuration (total, count) in a steady loop, and count
    the ATen ops of every foreach path (benchmarks/op_counts.py); return the JSON-ready
    results."""
    dev = torch.device(device)
    other_load = OtherLoad()
    configs = [(s, c) for s in sizes for c in counts if (s, c) not in skip]
    result: dict[str, Any] = {
        "environment": environment(device),
        "method": {
            "timing": "median step of round-robin rounds (one step per variant) after warm-up",
            "min_time_s_per_family_and_config": min_time_s,
            "min_rounds": 5,
            "warmup_steps": 1,
            "dtype": "float32",
            "grads": "fixed, N(0, 1)",
            "bytes_per_elem": "docs/design.md minimal reads + writes per element",
            "families": list(families),
        },
        "copy_numel": max(sizes),
        "copy_bandwidth_gb_per_s": copy_bandwidth(max(sizes), dev),
        "skipped": [
            {"total_params": s, "n_tensors": c, "reason": "CPU time budget"} for s, c in skip
        ],
        "rows": [],
    }
    for total, count in tqdm(configs, desc="overhead", unit="config", dynamic_ncols=True):
        result["rows"] += time_config(total, count, dev, min_time_s, families=families)
    if steady is not None:
        result["steady"] = steady_rows(*steady, dev, families=families)
    result["environment"]["other_processes_cores"] = other_load.cores()
    from benchmarks import op_counts

    result["op_counts"] = op_counts.run()
    return result


def _parse_size(text: str) -> int:
    return int(float(text.rstrip("Mm")) * 1e6) if text[-1] in "Mm" else int(text)


def _parse_sizes(text: str) -> tuple[int, ...]:
    return tuple(_parse_size(s) for s in text.split(","))


def _parse_steady(text: str) -> tuple[int, int] | None:
    """``SIZE,COUNT`` (e.g. ``10M,100``) or ``none``."""
    if text.lower() == "none":
        return None
    size, count = text.split(",")
    return _parse_size(size), int(count)


def _parse_families(text: str) -> tuple[str, ...]:
    families = tuple(text.split(","))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown families {unknown}; known: {list(FAMILIES)}")
    return families


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m benchmarks.overhead [--device cuda] [--sizes 1M,10M] ...``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", type=_parse_sizes, default=SIZES, help="total parameters, e.g. 1M,10M,50M"
    )
    parser.add_argument(
        "--counts",
        type=lambda s: tuple(map(int, s.split(","))),
        default=COUNTS,
        help="tensors per size, e.g. 10,1000",
    )
    parser.add_argument(
        "--families",
        type=_parse_families,
        default=FAMILIES,
        help=f"optimizer families to time, e.g. adam,adamw (default: {','.join(FAMILIES)}; "
        "adamw: torch's fused AdamW alone and with HyperLR)",
    )
    parser.add_argument(
        "--steady",
        type=_parse_steady,
        default=STEADY,
        help="SIZE,COUNT of the steady-loop table, e.g. 1M,10, or none (default: 10M,100)",
    )
    parser.add_argument(
        "--min-time", type=float, default=3.0, help="seconds of timed rounds per configuration"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    from benchmarks.overhead_report import write_overhead

    result = run_overhead(
        args.device, args.sizes, args.counts, args.min_time, steady=args.steady,
        families=args.families,
    )  # fmt: skip
    for path in write_overhead(result, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
