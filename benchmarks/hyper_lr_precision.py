"""How well the update HyperLR measures from the weights approximates the update applied.

HyperLR reads the previous step off the weights: u = (w_{t-1} - w_t) / lr, where w_t is the
result of the step as stored in the weights' dtype. Rounding w_t costs at most half a unit in the
last place, 2^-p |w_t| per element (p = 24 for float32, 8 for bfloat16, 11 for float16), so

    |u_i - d_i| / |d_i|  <=  2^-p |w_i| / |lr d_i|         (per element; norm-wise the same with
                                                            the norms of w and lr d)

and an update below half a unit in the last place of its weight is lost altogether. For
n = 10^6 elements with w, d, g ~ N(0, 1) (fixed seed, CPU), at several ratios |lr d| / |w|,
float32 weights and bfloat16 / float16 weights (the step rounded to that dtype, as an optimizer
stepping such params does, with d in that dtype too), this measures: the share of updates lost,
the relative error of u against d and the bound above, the largest per-element error over its
bound, and the relative error of h = <g, u> against <g, d>, summed in float64 and by HyperLR's
reference pass (``hyper_lr_sums_``, float32 sums). Writes ``hyper_lr_precision.md``.

    python -m benchmarks.hyper_lr_precision
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.timing import environment

N = 1_000_000
SEED = 0
RATIOS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Significand bits p (the implicit one included): the unit roundoff is 2^-p.
PRECISION_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


def sample(n: int = N, seed: int = SEED) -> dict[str, Tensor]:
    """w, d and g ~ N(0, 1), float64."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, generator=gen, dtype=torch.float64) for name in ("w", "d", "g")}


def _relative(error: Tensor, reference: Tensor) -> float:
    return float(error.norm() / reference.norm())


def step(w: Tensor, d: Tensor, lr: float) -> Tensor:
    """w - lr d rounded once to the weights' dtype, as torch's Adam and AdamW apply their update
    (``addcdiv_`` with a float ``value``)."""
    return (w.double() - lr * d.double()).to(w.dtype)


def _step_lr(w: Tensor, d: Tensor, ratio: float) -> float:
    """The LR that makes |lr d| / |w| = ``ratio``, rounded to float32 so that the step applies it
    exactly (the error measured is then that of the weights alone)."""
    lr = ratio * float(w.double().norm() / d.double().norm())
    return float(torch.tensor(lr, dtype=torch.float32))


def _pass_h(before: Tensor, after: Tensor, g: Tensor, lr: float) -> float:
    """<g, u> as HyperLR's reference pass forms it: the sum <g, snapshot - w_t> in float32."""
    from hyperlr_ext.functional.hyper_lr import hyper_lr_sums_

    sums = hyper_lr_sums_([after], [g], [before.clone()], [1], 1, weight_decay=0.0, maximize=False)
    return float(sums[0, 0]) / lr


def measure(data: dict[str, Tensor], dtype: torch.dtype, ratio: float) -> dict[str, Any]:
    """One row: weights, direction and gradient in ``dtype``, one step at |lr d| / |w| = ratio."""
    w, d, g = (data[name].to(dtype) for name in ("w", "d", "g"))
    lr = _step_lr(w, d, ratio)
    after = step(w, d, lr)
    w64, d64, g64, after64 = w.double(), d.double(), g.double(), after.double()
    u = (w64 - after64) / lr
    unit = 2.0 ** -PRECISION_BITS[dtype]
    normal = after64.abs() >= torch.finfo(dtype).tiny
    element_bound = unit * after64.abs()
    h_true = float(g64 @ d64)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "ratio": ratio,
        "lr": lr,
        "lost": float(((after == w) & (d != 0)).double().mean()),
        "u_error": _relative(u - d64, d64),
        "bound": unit * float(w64.norm() / (lr * d64).norm()),
        "max_over_element_bound": float(
            ((lr * (u - d64)).abs()[normal] / element_bound[normal]).max()
        ),
        "h_error": abs(float(g64 @ u) - h_true) / abs(h_true),
        "h_pass_error": abs(_pass_h(w, after, g, lr) - h_true) / abs(h_true),
    }


def run(n: int = N, seed: int = SEED) -> list[dict[str, Any]]:
    data = sample(n, seed)
    return [measure(data, dtype, ratio) for dtype in DTYPES for ratio in RATIOS]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| weights | \\|lr·d\\| / \\|w\\| | updates lost | rel. error of u | bound "
        "2^-p·\\|w\\|/\\|lr·d\\| | max per-element error / bound | rel. error of h, float64 "
        "sum | rel. error of h, HyperLR's pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['ratio']:.0e} | {r['lost']:.1%} | {r['u_error']:.2e} | "
            f"{r['bound']:.2e} | {r['max_over_element_bound']:.2f} | {r['h_error']:.2e} | "
            f"{r['h_pass_error']:.2e} |"
        )
    return "\n".join(lines)


def _method(n: int, seed: int) -> str:
    """The paragraph that says what each column measures."""
    return (
        f"n = {n:,} elements, w, d, g ~ N(0, 1) (seed {seed}), d and g in the weights' dtype; "
        "one step w_t = w − lr·d rounded once to that dtype (as torch's Adam and AdamW apply "
        "their update, by `addcdiv_`; CPU `add_(d, alpha=-lr)`, SGD's update, also rounds lr to "
        "a bfloat16 / float16 tensor's dtype, which scales u by up to 1 ± 2^-8 / 2^-11 more), lr "
        "(a float32 value) set so that \\|lr·d\\| / \\|w\\| is the ratio of the row; "
        "u = (w − w_t) / lr in float64. "
        "Updates lost: entries with w_t = w. Rel. error of u: \\|u − d\\| / \\|d\\|. Rounding "
        "w_t to p significand bits (float32 24, bfloat16 8, float16 11) predicts "
        "\\|u_i − d_i\\| / \\|d_i\\| ≤ 2^-p·\\|w_i\\| / \\|lr·d_i\\| per element — for float32 "
        "2^-24 ≈ 6e-8 times \\|w\\| / \\|lr·d\\| — and norm-wise the bound column; the max "
        "column is max_i \\|lr·(u_i − d_i)\\| / (2^-p·\\|w_t,i\\|) over normal-range weights "
        "(≤ 1: the bound holds for every element). Rel. error of h: \\|⟨g, u⟩ − ⟨g, d⟩\\| / "
        "\\|⟨g, d⟩\\|, the sum in float64, and as HyperLR's reference pass `hyper_lr_sums_` "
        "forms it (float32 sums). With g independent of d, ⟨g, d⟩ is about \\|g\\|·\\|d\\| / "
        "√n: the errors of h are those of u times a random factor of order one, plus, for the "
        "pass, float32 summation over terms √n larger than the result."
    )


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], n: int, seed: int) -> str:
    machine = (
        f"{env['device_name']}, {env['cpu_count']} CPUs, torch {env['torch_version']}, "
        f"hyperlr_ext {env['hyperlr_ext_version']}, {env['date']}. `python -m "
        "benchmarks.hyper_lr_precision`."
    )
    title = "# Precision of the update HyperLR measures from the weights"
    return "\n".join([title, "", machine, "", _method(n, seed), "", table(rows), ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=N, help=f"elements (default {N:,})")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    text = markdown(run(args.n, args.seed), environment("cpu"), args.n, args.seed)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "hyper_lr_precision.md"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
