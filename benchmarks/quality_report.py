"""Tables and plots for the quality benchmark (``quality.json`` -> ``quality.md`` and PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.quality import MODEL_TITLES  # noqa: E402

FAMILY_COLORS = {"SGD": "tab:blue", "SGDN": "tab:orange", "Adam": "tab:green"}


def _style(method: str) -> tuple[str, str]:
    """Colour by family (SGD, SGDN, Adam); solid baseline, dashed additive HD, dotted mult. HD."""
    family = method.split("-")[0].split(" ")[0]
    line = ":" if "mult" in method else "--" if "-HD" in method else "-"
    return FAMILY_COLORS.get(family, "tab:gray"), line


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _epoch_time(run: dict[str, Any]) -> float:
    """Median wall time of an epoch, leaving out the first one (warm-up) when there are several."""
    times = run["epoch_time_s"]
    return float(np.median(times[1:] if len(times) > 1 else times))


def summarize(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per model, one row per method: mean and std over seeds of the final metrics."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for model in results["config"]["models"]:
        rows[model] = []
        for method in results["methods"]:
            runs = [
                r for r in results["runs"] if r["model"] == model and r["method"] == method["name"]
            ]
            row = {
                **method,
                "n_seeds": len(runs),
                "epoch_time_s": _mean_std([_epoch_time(r) for r in runs]),
            }
            for key in ("test_acc", "test_loss", "final_lr"):
                row[key] = _mean_std([r[key] for r in runs])
            rows[model].append(row)
    return rows


def _pm(stat: tuple[float, float], fmt: str, scale: float = 1.0) -> str:
    return f"{stat[0] * scale:{fmt}} ± {stat[1] * scale:{fmt}}"


def markdown(results: dict[str, Any]) -> str:
    """The ``quality.md`` text: one table per model."""
    cfg = results["config"]
    lines = [
        "# Quality: HD optimizers vs fixed-LR baselines on embedded MNIST",
        "",
        f"Data: {cfg['data']}, {cfg['n_train']} train / {cfg['n_test']} test images. "
        f"{cfg['epochs']} epochs of {cfg['steps_per_epoch']} steps "
        f"(minibatch {cfg['batch_size']}), seeds {', '.join(map(str, cfg['seeds']))} "
        f"(initial weights and batch order); device `{cfg['device']}`.",
        "Mean ± std over seeds of the final test accuracy and loss and of the LR the last step "
        "applied (`effective_lr` for HD). Time per epoch is relative to SGD on the same model "
        "(median epoch, warm-up epoch left out) and includes reading loss and LR back each step.",
    ]
    env = results.get("environment")
    if env:
        lines.append(
            f"torch {env['torch_version']}, hyperlr_ext {env['hyperlr_ext_version']}, "
            f"{env['device_name']}, {env['torch_threads']} threads, {env['date']}; other processes "
            f"kept {env['other_processes_cores']:.2f} of {env['cpu_count']} cores busy on average "
            "during the run (timings are noisy above ~0.1)."
        )
    for model, rows in summarize(results).items():
        sgd_time = next(
            (r["epoch_time_s"][0] for r in rows if r["name"] == "SGD"), rows[0]["epoch_time_s"][0]
        )
        lines += [
            "",
            f"## {MODEL_TITLES.get(model, model)}",
            "",
            f"SGD: {sgd_time * 1e3:.1f} ms per epoch.",
            "",
            "| method | optimizer | lr0 | hyper_lr | test acc (%) | test loss | final LR "
            "| time/epoch vs SGD |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            hyper = "—" if r["hyper_lr"] is None else f"{r['hyper_lr']:g}"
            lines.append(
                f"| {r['name']} | `{r['optimizer']}` | {r['lr']:g} | {hyper} "
                f"| {_pm(r['test_acc'], '.2f', 100)} | {_pm(r['test_loss'], '.3f')} "
                f"| {r['final_lr'][0]:.3g} ± {r['final_lr'][1]:.2g} "
                f"| {r['epoch_time_s'][0] / sgd_time:.2f}× |"
            )
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], model: str, key: str, ylabel: str, path: Path) -> None:
    log_every = results["config"]["log_every"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in results["methods"]:
        runs = [r for r in results["runs"] if r["model"] == model and r["method"] == method["name"]]
        curves = np.asarray([r[key] for r in runs], dtype=float)
        if curves.size == 0:
            continue
        steps = (np.arange(curves.shape[1]) + 1) * log_every
        color, line = _style(method["name"])
        ax.plot(steps, curves.mean(0), line, color=color, label=method["name"], lw=1.5)
        if len(runs) > 1:
            ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    seeds = len(results["config"]["seeds"])
    ax.set_title(f"{MODEL_TITLES.get(model, model)}: mean over {seeds} seed(s), band = min–max")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_quality_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``quality.md`` and the loss/LR PNGs per model into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "quality.md"]
    paths[0].write_text(markdown(results))
    every = results["config"]["log_every"]
    for model in results["config"]["models"]:
        loss_png, lr_png = (
            out_dir / f"quality_loss_{model}.png",
            out_dir / f"quality_lr_{model}.png",
        )
        _plot(results, model, "train_loss", f"train loss (mean of {every} steps)", loss_png)
        _plot(results, model, "effective_lr", "effective learning rate", lr_png)
        paths += [loss_png, lr_png]
    return paths
