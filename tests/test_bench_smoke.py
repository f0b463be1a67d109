"""Smoke test of the main benchmark (benchmarks/): a tiny configuration runs every method end to
end, the cache makes a second call run nothing, and the report has its structure (headline
table with every method, per-task tables, JSON summary, plots). Runs in CI (~10 s)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # last: the installed hyperlr_ext (with _C) stays first

robustness = pytest.importorskip("benchmarks.robustness")
report = pytest.importorskip("benchmarks.report")
methods = pytest.importorskip("benchmarks.methods")


def test_tiny_run_report_and_resume(tmp_path, monkeypatch):
    cfg = robustness.BenchConfig(tasks=("digits-logreg",), seeds=(0,), epoch_scale=0.1,
                                 lr_points=1, log_points=5)  # fmt: skip
    results = robustness.run_benchmark(cfg, "cpu", cache_root=tmp_path / "cache", progress=False)
    logreg = [m for m in methods.METHODS if "logreg" in m.models]
    assert len(results) == len(robustness.run_list(cfg)) == len(logreg)
    for r in results:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["seconds_per_step"] > 0
        assert r["train_loss"] and len(r["lr"]) == len(r["train_loss"])

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(robustness, "train_run", no_training)
    again = robustness.run_benchmark(cfg, "cpu", cache_root=tmp_path / "cache", progress=False)
    assert json.dumps(again) == json.dumps(results)  # (NaN lr0 compares unequal as floats)

    out = tmp_path / "out"
    written = report.write_report(results, cfg, "cpu", out, ["## Extra section\n\ntext"])
    assert all(p.is_file() for p in written)
    md = (out / "report.md").read_text()
    headline = md.split("## Headline", 1)[1].split("## Per task", 1)[0]
    for m in logreg:
        assert f"| {m.name} | {m.family} |" in headline
    assert "### digits-logreg" in md and "## Extra section" in md
    preset = md.split("## The robust preset against the learning-rate-free optimizers", 1)[1]
    assert "| digits-logreg | Adam-HD robust: **" in preset and "Target: " in preset
    data = json.loads((out / "report.json").read_text())
    assert set(data) == {"environment", "config", "summary", "time_to_target", "runs"}
    assert all(len(r["val"]) == len(r["val_steps"]) == len(r["train_loss"]) for r in results)
    assert "## Time to target" in md and (out / "report_profile.png").stat().st_size > 1000
    assert {row["method"] for row in data["summary"]} == {m.name for m in logreg}
    for name in ("report_robustness.png", "report_loss_digits-logreg.png",
                 "report_lr_digits-logreg.png"):  # fmt: skip
        assert (out / name).stat().st_size > 1000


def _close(a, b, rel: float = 1e-5) -> bool:
    """Equal structure and non-float leaves, floats within ``rel`` (NaN equals NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_close, a, b))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
    return a == b


def test_worker_processes_train_the_same_runs(tmp_path):
    """Two spawned workers give every run the result one process gives (only the timings and
    the thread count may differ)."""
    cfg = robustness.BenchConfig(tasks=("digits-logreg",), seeds=(0, 1), epoch_scale=0.1,
                                 lr_points=1, log_points=5)  # fmt: skip
    runs = [("digits-logreg", name, 0.01, seed) for name in ("Adam-HD robust", "Adam")
            for seed in (0, 1)]  # fmt: skip
    one = robustness.run_benchmark(cfg, "cpu", tmp_path / "a", progress=False, runs=runs)
    two = robustness.run_benchmark(cfg, "cpu", tmp_path / "b", progress=False, runs=runs,
                                   workers=2)  # fmt: skip
    timed = {"seconds_per_epoch", "seconds_per_step", "val_seconds", "torch_threads"}
    for a, b in zip(one, two):
        # A worker runs one intra-op thread, so float32 reductions may round differently.
        assert _close({k: v for k, v in a.items() if k not in timed},
                      {k: v for k, v in b.items() if k not in timed})  # fmt: skip
    assert [r["method"] for r in two] == [name for _, name, _, _ in runs]


def test_amortised_marthe_study(tmp_path):
    amortised = pytest.importorskip("benchmarks.marthe_amortised")
    cfg = robustness.BenchConfig(tasks=("digits-logreg",), seeds=(0,), epoch_scale=0.1,
                                 lr_points=1, log_points=5)  # fmt: skip
    result = amortised.run_amortised(cfg, "cpu", cache_root=tmp_path / "cache", progress=False)
    assert {r["method"] for r in result["summary"]} == {"SGD", "MARTHE",
                                                         *methods.AMORTISED_NAMES}  # fmt: skip
    errors = {r["setting"]: r for r in result["errors"]}
    assert set(errors) == {amortised.EXACT, *methods.AMORTISED_SETTINGS}
    assert errors[amortised.EXACT]["median"] == 0.0
    assert errors["HVP every 8"]["median"] > 0.0  # skipping products changes Delta
    md = amortised.write_amortised(result, report.environment("cpu"), tmp_path)[0].read_text()
    for name in methods.AMORTISED_NAMES:
        assert f"| {name} |" in md
    assert "## Target" in md and "## Hypergradient error" in md


def test_language_model_task(tmp_path):
    """The text corpus ships with Python; the character GPT trains with every method that
    applies to it, and the report ranks the language model by held-out loss (lower is
    better)."""
    text = pytest.importorskip("benchmarks.text")
    data = text.load_text()
    assert data["x_train"].shape[1] == text.CONTEXT and len(data["x_test"]) > 100
    assert torch.equal(data["x_train"][0, 1:], data["y_train"][0, :-1])  # the next characters
    cfg = robustness.BenchConfig(tasks=("text-gpt",), seeds=(0,), epoch_scale=0.01,
                                 lr_points=1, log_points=2,
                                 methods=tuple(m.name for m in methods.METHODS
                                               if "gpt" in m.models))  # fmt: skip
    results = robustness.run_benchmark(cfg, "cpu", cache_root=tmp_path / "cache", progress=False)
    vocab = int(data["vocab"])
    for r in results:  # a few steps: finite, and AdamW's near the uniform guess's log V
        assert 0 < r["test_loss"] < math.inf
        if r["method"] == "AdamW":
            assert r["test_loss"] < 1.2 * math.log(vocab)
    rows = robustness.summarise(results, cfg)
    assert {r["metric"] for r in rows} == {"loss"}
    md = report.markdown(rows, cfg, report.environment("cpu"), [])
    assert "text-gpt (loss ↓): worst / best" in md and "ppl" in md


def test_beta_axis(tmp_path):
    beta_axis = pytest.importorskip("benchmarks.beta_axis")
    cfg = robustness.BenchConfig(tasks=("digits-logreg",), seeds=(0,), epoch_scale=0.1,
                                 lr_points=1, log_points=5)  # fmt: skip
    result = beta_axis.run_beta_axis(cfg, "cpu", cache_root=tmp_path / "cache", progress=False)
    names = {r["method"] for r in result["rows"]}
    assert names == {m.name for m in methods.METHODS
                     if m.family in ("HD", "tangent") and "logreg" in m.models}  # fmt: skip
    for r in result["rows"]:
        assert [p["scale"] for p in r["points"]] == list(beta_axis.SCALES)
    # The hyper-LR reaches the optimizer: SGD-HD's learned LR differs across the axis.
    runs = robustness.run_benchmark(cfg, "cpu", cache_root=tmp_path / "cache", progress=False,
                                    runs=[("digits-logreg", "SGD-HD", 1e-2, 0, s)
                                          for s in beta_axis.SCALES])  # fmt: skip
    assert len({r["lr"][-1] for r in runs}) == len(beta_axis.SCALES)
    written = beta_axis.write_beta_axis(result, tmp_path)
    assert "## digits-logreg" in written[0].read_text() and written[2].stat().st_size > 1000


def test_toys_from_both_initial_lrs(tmp_path):
    toys = pytest.importorskip("benchmarks.toys")
    result = toys.run_toys(steps=20, betas=(1e-4,))
    starts = {(r["function"], r["lr0"]) for r in result["runs"]}
    assert starts == {("beale", 0.0), ("beale", 1e-3), ("bukin", 0.0), ("bukin", 1e-2)}
    md = toys.markdown(result)
    assert "| bukin | 0.01 |" in md and "| beale | 0 |" in md


def test_time_to_target_on_known_curves():
    """Targets, times and the profile from hand-written validation curves."""
    ttt = pytest.importorskip("benchmarks.time_to_target")
    cfg = robustness.BenchConfig(tasks=("digits-logreg",), seeds=(0, 1),
                                 methods=("SGD", "SGD-HD", "Prodigy"))  # fmt: skip

    def run(name, lr, seed, val):
        return {"task": "digits-logreg", "method": name, "lr0": lr, "seed": seed,
                "test_accuracy": val[-1], "test_loss": 0.5, "diverged": False,
                "seconds_per_step": 1.0, "val": val, "val_steps": [10, 20, 30],
                "val_seconds": [1.0, 2.0, 3.0]}  # fmt: skip

    results = [run("SGD", lr, seed, [0.5, 0.8, 0.9 if lr == 0.1 else 0.7])
               for lr in methods.SGD_LRS for seed in (0, 1)]  # fmt: skip
    results += [run("SGD-HD", lr, seed, [0.5, 0.895, 0.9]) for lr in methods.SGD_LRS
                for seed in (0, 1)]  # fmt: skip
    results += [run("Prodigy", math.nan, 0, [0.2, 0.3, 0.4]),
                run("Prodigy", math.nan, 1, [0.2, 0.3, 0.95])]  # fmt: skip
    rows = robustness.summarise(results, cfg)
    assert ttt.targets(results, rows, cfg) == {"digits-logreg": pytest.approx(0.9 * 0.99)}
    times = {t["method"]: t for t in ttt.times_to_target(results, rows, cfg)}
    assert (times["SGD"]["steps"], times["SGD"]["seconds"]) == (30, 3.0)
    assert (times["SGD-HD"]["steps"], times["SGD-HD"]["reached"]) == (20, 2)
    assert times["Prodigy"]["reached"] == 1 and times["Prodigy"]["seconds"] is None  # 1 of 2
    fractions = ttt.profile(list(times.values()))
    assert fractions["SGD-HD"][0] == 1.0  # the fastest on the only task
    assert fractions["SGD"][ttt.TAUS.index(1.5)] == 1.0 and fractions["SGD"][0] == 0.0
    assert fractions["Prodigy"] == [0.0] * len(ttt.TAUS)
    assert "not reached" in ttt.markdown(list(times.values()))


def test_cli_help_and_modes():
    main = pytest.importorskip("benchmarks.__main__")
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert main._config(main.parse_args(["--full"])) == robustness.FULL
    assert main._config(main.parse_args([])) == robustness.DEFAULT
    assert main.parse_args(["--only", "toys", "--only", "marthe"]).only == ["toys", "marthe"]
    with pytest.raises(SystemExit):
        main.parse_args(["--quick", "--full"])


def test_one_pool_trains_every_run_of_the_studies_once():
    main = pytest.importorskip("benchmarks.__main__")
    beta_axis = pytest.importorskip("benchmarks.beta_axis")
    cfg = robustness.DEFAULT
    runs = main._training_runs(cfg, {"robustness", "marthe"})
    text = [repr(r) for r in runs]  # NaN (the LR-free methods' LR) is not equal to itself
    assert len(text) == len(set(text)) and all(len(r) == 5 for r in runs)
    wanted = (robustness.run_list(cfg) + robustness.run_list(robustness.amortised(cfg))
              + beta_axis.beta_runs(cfg))  # fmt: skip
    assert set(text) == {repr(robustness.unpack_run(r)) for r in wanted}
    # The beta axis's runs at scale 1 are the robustness study's own.
    assert any(r[4] == 1.0 for r in map(robustness.unpack_run, beta_axis.beta_runs(cfg)))
    assert len(runs) < len(wanted)
    assert main._training_runs(cfg, {"toys"}) == []
