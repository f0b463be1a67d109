"""Toy benchmark of the tangent methods (MARTHE paper, Section 3 and Figure 1).

Gradient descent with E = L for 500 steps on two 2-D functions, from fixed starting points:
Beale (sharp peaks, wide plateaus) from (1, 1.5), and the paper's simplified, smoothed Bukin N.6
L(x, y) = sqrt(sqrt((y - 0.01 x)^2 + eps) + eps), eps = 1e-3, from (5, 2). HD (mu = 0), RTHO
(mu = 1) and MARTHE (adaptive mu) run with the same fixed hyper-LR beta over a grid, from two
initial LRs: eta_0 = 0 (the paper's advice without prior knowledge) and a small positive one
(the paper does not state which it used); the tables give the best optimality gap each method
reaches for the best non-divergent beta, and the fraction of MARTHE's steps with mu = 0 / mu = 1.
Float64, CPU, deterministic, ~1 minute.

    python -m benchmarks.toys --help
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

import hyperlr_ext as hx
from benchmarks.pool import run_all

STEPS = 500
BETAS = (1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 1e-4, 5e-4, 1e-3, 1e-2, 1e-1)
METHODS = {"HD": 0.0, "RTHO": 1.0, "MARTHE": "adaptive"}
BUKIN_EPS = 1e-3


def beale(w: torch.Tensor) -> torch.Tensor:
    x, y = w[0], w[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def bukin(w: torch.Tensor) -> torch.Tensor:
    x, y = w[0], w[1]
    return torch.sqrt(torch.sqrt((y - 0.01 * x) ** 2 + BUKIN_EPS) + BUKIN_EPS)


# (function, start, minimum value, the positive initial LR)
FUNCTIONS = {
    "beale": (beale, (1.0, 1.5), 0.0, 1e-3),
    "bukin": (bukin, (5.0, 2.0), math.sqrt(math.sqrt(BUKIN_EPS) + BUKIN_EPS), 1e-2),
}


def initial_lrs(name: str) -> tuple[float, float]:
    """The two starts of a function: eta_0 = 0 and its positive initial LR."""
    return (0.0, FUNCTIONS[name][3])


def run_one(name: str, mu: str | float, beta: float, steps: int = STEPS,
            lr0: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """One run from the function's start with eta_0 = ``lr0``; records L, eta, mu and the
    path."""
    fn, start, minimum, _ = FUNCTIONS[name]
    w = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = hx.MARTHE([w], lr=lr0, hyper_lr=beta, mu=mu)
    group = opt.param_groups[0]
    losses, lrs, mus, path = [], [], [], []
    for _ in range(steps):
        path.append(w.detach().tolist())
        loss = opt.step(lambda: fn(w))
        losses.append(float(loss))
        lrs.append(float(group["learned_lr"]))
        mus.append(float(group["learned_mu"]))
    final = float(fn(w.detach()))
    diverged = not all(math.isfinite(v) for v in losses + [final]) or final > 10 * losses[0]
    gaps = [v - minimum for v in losses + [final] if math.isfinite(v)]
    return {
        "function": name, "mu": mu, "beta": beta, "lr0": lr0, "diverged": diverged,
        "best_gap": min(gaps) if gaps and not diverged else None,
        "loss": losses, "lr": lrs, "learned_mu": mus, "path": path,
    }  # fmt: skip


def _run(item: tuple[str, str | float, float, int, float]) -> dict[str, Any]:
    return run_one(*item)


def run_toys(steps: int = STEPS, betas: tuple[float, ...] = BETAS,
             workers: int = 1) -> dict[str, Any]:  # fmt: skip
    """Every run, ``workers`` at a time (benchmarks/pool.py; nothing here is timed)."""
    items = [
        (fn, mu, beta, steps, lr0)
        for fn in FUNCTIONS
        for lr0 in initial_lrs(fn)
        for mu in METHODS.values()
        for beta in betas
    ]
    runs: list[Any] = [None] * len(items)
    for index, result in run_all(_run, items, workers):
        runs[index] = result
    return {"steps": steps, "betas": list(betas), "bukin_eps": BUKIN_EPS, "runs": runs}


def _gap(value: float) -> str:
    # L* is met to the last bit when |y - 0.01 x| squared vanishes next to eps in float64.
    return "0 (float64 resolution)" if value == 0 else f"{value:.2e}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Toy functions: HD vs RTHO vs MARTHE (gradient descent, E = L, {result['steps']} steps)",
        "",
        "Best optimality gap L - L* reached within the run, for the best beta of the grid "
        f"{result['betas']} that does not diverge (— : every beta diverged), from eta_0 = 0 (the "
        "paper's advice) and from a small positive eta_0 (the paper does not state its own).",
        "",
        "| function | eta_0 | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for fn, lr0 in ((fn, lr0) for fn in FUNCTIONS for lr0 in initial_lrs(fn)):
        cells = []
        for method, mu in METHODS.items():
            ok = [
                r
                for r in result["runs"]
                if r["function"] == fn
                and r["mu"] == mu
                and not r["diverged"]
                and r.get("lr0", 0.0) == lr0
            ]
            best = min(ok, key=lambda r: r["best_gap"], default=None)
            cells.append(
                "—" if best is None else f"{_gap(best['best_gap'])} (beta {best['beta']:g})"
            )
        lines.append(f"| {fn} | {lr0:g} | " + " | ".join(cells) + " |")
    lines += ["", "MARTHE's mu per beta (fraction of steps with mu = 0 / mu = 1, best gap):", ""]
    lines += ["| function | eta_0 | beta | mu = 0 | mu = 1 | best gap |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["runs"]:
        if r["mu"] != "adaptive":
            continue
        mus = r["learned_mu"][1:]
        zero = sum(m == 0.0 for m in mus) / len(mus)
        one = sum(m == 1.0 for m in mus) / len(mus)
        gap = "diverged" if r["diverged"] else _gap(r["best_gap"])
        lines.append(f"| {r['function']} | {r.get('lr0', 0.0):g} | {r['beta']:g} | {zero:.0%} | "
                     f"{one:.0%} | {gap} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for fn_name, (fn, _, _, _) in FUNCTIONS.items():
        best = {}
        for method, mu in METHODS.items():
            ok = [r for r in result["runs"]
                  if r["function"] == fn_name and r["mu"] == mu and not r["diverged"]
                  and r.get("lr0", 0.0) == 0.0]  # fmt: skip
            if ok:
                best[method] = min(ok, key=lambda r: r["best_gap"])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        xs = [p[0] for r in best.values() for p in r["path"]]
        ys = [p[1] for r in best.values() for p in r["path"]]
        if xs:
            pad_x, pad_y = 0.2 * (max(xs) - min(xs)) + 0.1, 0.2 * (max(ys) - min(ys)) + 0.1
            gx = torch.linspace(min(xs) - pad_x, max(xs) + pad_x, 200, dtype=torch.float64)
            gy = torch.linspace(min(ys) - pad_y, max(ys) + pad_y, 200, dtype=torch.float64)
            xx, yy = torch.meshgrid(gx, gy, indexing="xy")
            zz = fn(torch.stack([xx, yy]))
            axes[0].contour(xx, yy, torch.log10(zz - zz.min() + 1e-6), levels=30, linewidths=0.5)
        for method, r in best.items():
            label = f"{method} (beta {r['beta']:g})"
            axes[0].plot([p[0] for p in r["path"]], [p[1] for p in r["path"]], label=label)
            axes[1].semilogy([max(v, 1e-12) for v in r["lr"]], label=label)
            axes[2].plot(r["learned_mu"], label=label)
        axes[0].set_title(f"{fn_name}: trajectories from eta_0 = 0")
        axes[1].set_title("learned LR")
        axes[2].set_title("mu")
        for ax in axes:
            ax.legend(fontsize=7)
        axes[1].set_xlabel("step")
        axes[2].set_xlabel("step")
        fig.tight_layout()
        path = out_dir / f"toys_{fn_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_toys(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "toys.json", out_dir / "toys.md"
    slim = {**result, "runs": [{k: v for k, v in r.items() if k != "path"} for r in result["runs"]]}
    json_path.write_text(json.dumps(slim) + "\n")
    md_path.write_text(markdown(result))
    return [json_path, md_path, *plots(result, out_dir)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    for path in write_toys(run_toys(args.steps), args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
