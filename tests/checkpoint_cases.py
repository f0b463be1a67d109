"""The training runs of test_checkpoints.py, importable by the test and by the process that
resumes from a checkpoint (``python checkpoint_cases.py CASE CHECKPOINT OUT``)."""

from __future__ import annotations

import sys

import torch

import hyperlr_ext as hx

STEPS_BEFORE, STEPS_AFTER = 6, 7


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()


def _batch(t):
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    return x, torch.randn(8, 2, generator=gen, dtype=torch.float64)


def _loss(model, t):
    x, y = _batch(t)
    return torch.nn.functional.mse_loss(model(x), y)


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _hyper_lr(opt):
    hx.HyperLR(opt, 1e-4, per_tensor=True)  # its state travels in the optimizer's state_dict
    return opt


# name -> (build(model) -> (optimizer, scheduler or None), protocol)
CASES = {
    "SGDHD": (lambda m: (hx.SGDHD(m.parameters(), lr=0.05, hyper_lr=1e-2, momentum=0.9), None),
              "backward"),
    "SGDHD-foreach-per-tensor": (lambda m: (hx.SGDHD(m.parameters(), lr=0.05, hyper_lr=1e-2,
                                                     per_tensor=True, foreach=True), None),
                                 "backward"),
    "AdamHD": (lambda m: (hx.AdamHD(m.parameters(), lr=1e-2, hyper_lr=1e-4), None), "backward"),
    "AdamHD-lag-mult": (lambda m: (hx.AdamHD(m.parameters(), lr=1e-2, hyper_lr=1e-2, lr_lag=1,
                                             multiplicative=True), None), "backward"),
    "MARTHE": (lambda m: (hx.MARTHE(m.parameters(), lr=0.05, hyper_lr=1e-3,
                                    hyper_hyper_lr=1e-4, momentum=0.9), None), "closure"),
    "MARTHE-adam": (lambda m: (hx.MARTHE(m.parameters(), lr=1e-2, hyper_lr=1e-4,
                                         inner="adamw", weight_decay=0.01), None), "closure"),
    "RTHO": (lambda m: (hx.RTHO(m.parameters(), lr=0.05, hyper_lr=1e-3, nesterov=True,
                                momentum=0.9), None), "closure"),
    "TLR": (lambda m: (lambda o: (o, hx.TLR(o, update_every=3)))(_sgd(m)), "backward"),
    "MLRSNet": (lambda m: (lambda o: (o, hx.MLRSNet(o, meta_every=2, hidden_size=8)))(_sgd(m)),
                "mlr"),
    "HyperLR-AdamW": (lambda m: (_hyper_lr(torch.optim.AdamW(m.parameters(), lr=1e-2)), None),
                      "backward"),
}  # fmt: skip


def build(name):
    model = _model()
    torch.manual_seed(1)  # MLR-SNet's net
    opt, sched = CASES[name][0](model)
    return model, opt, sched


def train(name, model, opt, sched, steps, first):
    protocol = CASES[name][1]
    for t in range(first, first + steps):
        if protocol == "closure":
            opt.step(lambda t=t: _loss(model, t))
            continue
        opt.zero_grad()
        loss = _loss(model, t)
        loss.backward()
        opt.step()
        if protocol == "mlr":
            sched.step(loss.detach(), val_closure=lambda: _loss(model, 999))
        elif sched is not None:
            sched.step()


def snapshot(model, opt):
    out = {f"param{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    for i, group in enumerate(opt.param_groups):
        out[f"lr{i}"] = torch.as_tensor(group["lr"], dtype=torch.float64).clone()
        if "learned_lr" in group:
            out[f"learned_lr{i}"] = group["learned_lr"].detach().clone()
    hyper = hx.HyperLR.attached(opt)
    if hyper is not None:
        for i, learned in enumerate(hyper.learned_lr):
            out[f"learned_lr{i}"] = learned.detach().clone()
    return out


def save(path, model, opt, sched):
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict() if sched is not None else None}, path)  # fmt: skip


def resume(name, checkpoint, out):
    """A new process: build fresh, load with weights_only=True, continue, save the end state."""
    model, opt, sched = build(name)
    saved = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    if sched is not None:
        sched.load_state_dict(saved["sched"])
    train(name, model, opt, sched, STEPS_AFTER, STEPS_BEFORE)
    torch.save(snapshot(model, opt), out)


if __name__ == "__main__":
    # name, checkpoint, out, name, checkpoint, out, ...: every case in one process.
    arguments = sys.argv[1:]
    for k in range(0, len(arguments), 3):
        resume(*arguments[k : k + 3])
