"""Operator count of one optimizer step: how many ATen ops ``step()`` dispatches.

On a GPU each dispatched op that touches memory is at least one kernel launch, so a step whose op
count grows with the number of parameter tensors pays launch latency per tensor (thousands of
launches for a transformer). Counted here on the CPU with a ``TorchDispatchMode``, which sees
every op below autograd. View ops (``aten.view``, ``aten.unbind``, ...) are counted apart: they
launch nothing. The two ``profiler`` record-function ops that torch.optim's ``step`` wrapper
issues are counted, for torch's optimizers and ours alike.

Each variant steps ``n`` tensors of 8 float32 elements with fixed gradients; the count is taken on
the third step (buffers exist, bias corrections and HD rules are in their steady form). The
foreach paths are counted in the branch they take on a GPU (on the CPU they reduce and step per
tensor, without temporaries: ``hyperlr_ext.functional._foreach_hd.LIST_OP_DEVICES``).

    python -m benchmarks.op_counts --counts 10,100,1000
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COUNTS = (10, 100, 1000)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched under it: ``launching`` (all but views) and ``views``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launching(self) -> int:
        return sum(self.ops.values())


@dataclass(frozen=True)
class Variant:
    """One optimizer configuration; ``baseline`` names the torch row it is compared with."""

    name: str
    baseline: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _hd(cls_name: str, **kwargs) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    def make(params):
        import hyperlr_ext as hx

        return getattr(hx, cls_name)(params, **kwargs)

    return make


def _with_hyper_lr(
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], **kwargs
) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """``make``'s optimizer with a HyperLR attached: its step runs the hook pair too."""

    def wrapped(params):
        import hyperlr_ext as hx

        optimizer = make(params)
        hx.HyperLR(optimizer, **kwargs)
        return optimizer

    return wrapped


def variants() -> list[Variant]:
    """torch's foreach/fused SGD, Adam and AdamW, every foreach path of SGD-HD, Adam-HD and the
    MARTHE tangent step (:class:`TangentStep`), and torch's AdamW with HyperLR's foreach pass
    (the ops of its hook pair are the difference to AdamW alone)."""
    sgd = dict(lr=1e-3, momentum=0.9)
    adam = dict(lr=1e-3)
    hd = dict(hyper_lr=1e-6, foreach=True)
    out = [
        Variant("torch SGD foreach", "torch SGD foreach",
                lambda p: torch.optim.SGD(p, foreach=True, **sgd)),
        Variant("torch SGD fused", "torch SGD foreach",
                lambda p: torch.optim.SGD(p, fused=True, **sgd)),
        Variant("torch Adam foreach", "torch Adam foreach",
                lambda p: torch.optim.Adam(p, foreach=True, **adam)),
        Variant("torch Adam fused", "torch Adam foreach",
                lambda p: torch.optim.Adam(p, fused=True, **adam)),
        Variant("torch AdamW foreach", "torch AdamW foreach",
                lambda p: torch.optim.AdamW(p, foreach=True, **adam)),
        Variant("torch AdamW fused", "torch AdamW foreach",
                lambda p: torch.optim.AdamW(p, fused=True, **adam)),
    ]  # fmt: skip
    hyper = dict(hyper_lr=1e-7, foreach=True)
    out += [
        Variant("torch AdamW foreach + HyperLR foreach", "torch AdamW foreach",
                _with_hyper_lr(lambda p: torch.optim.AdamW(p, foreach=True, **adam), **hyper)),
        Variant("torch AdamW fused + HyperLR foreach", "torch AdamW fused",
                _with_hyper_lr(lambda p: torch.optim.AdamW(p, fused=True, **adam), **hyper)),
    ]  # fmt: skip
    for label, extra in (
        ("", {}),
        (" nesterov", dict(nesterov=True)),
        (" multiplicative", dict(multiplicative=True, hyper_lr=0.02)),
        (" per-tensor", dict(per_tensor=True)),
        (" lr_lag=1", dict(lr_lag=1)),
        (" skip_nonfinite", dict(skip_nonfinite=True)),
    ):
        out.append(Variant(f"SGDHD foreach{label}", "torch SGD foreach",
                           _hd("SGDHD", **{**sgd, **hd, **extra})))  # fmt: skip
    for label, extra in (
        ("", {}),
        (" AdamW", dict(decoupled_weight_decay=True, weight_decay=0.01)),
        (" amsgrad", dict(amsgrad=True)),
        (" multiplicative", dict(multiplicative=True, hyper_lr=0.02)),
        (" per-tensor", dict(per_tensor=True)),
        (" lr_lag=1", dict(lr_lag=1)),
        (" skip_nonfinite", dict(skip_nonfinite=True)),
    ):
        out.append(Variant(f"AdamHD foreach{label}", "torch Adam foreach",
                           _hd("AdamHD", **{**adam, **hd, **extra})))  # fmt: skip
    sgd_tangent = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
    adam_tangent = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    out += [
        Variant("MARTHE tangent step SGD foreach", "torch SGD foreach",
                lambda p: TangentStep(p, "sgd", **sgd_tangent)),
        Variant("MARTHE tangent step Adam foreach", "torch Adam foreach",
                lambda p: TangentStep(p, "adam", decoupled_weight_decay=False, **adam_tangent)),
        Variant("MARTHE tangent step AdamW foreach", "torch Adam foreach",
                lambda p: TangentStep(p, "adam", decoupled_weight_decay=True, **adam_tangent)),
    ]  # fmt: skip
    return out


class TangentStep:
    """The MARTHE/RTHO tangent step alone (its inner step, the tangent update of every buffer and
    the hypergradient Delta = <Z_w, grad E>), on the foreach path: what the optimizer adds to
    the model's own forward, backward and Hessian-vector product."""

    def __init__(self, params: list[torch.Tensor], inner: str, **settings) -> None:
        self.params, self.inner, self.settings = params, inner, settings
        like = [torch.zeros_like(p) for p in params]
        self.lists = {k: [t.clone() for t in like] for k in ("z", "b", "zb", "m", "v", "zm", "zv")}
        self.hvps = [torch.ones_like(p) for p in params]
        self.lr, self.mu = torch.tensor(0.01), torch.tensor(1.0)
        self.count = torch.tensor(1.0)

    @torch.no_grad()
    def step(self) -> None:
        from hyperlr_ext.functional._foreach_hd import flat_dot
        from hyperlr_ext.functional.marthe import tangent_adam_step_, tangent_sgd_step_

        grads = [p.grad for p in self.params]
        c = self.lists
        flat_dot(c["z"], grads, torch.float32)
        if self.inner == "sgd":
            tangent_sgd_step_(self.params, grads, self.hvps, c["b"], c["z"], c["zb"], [],
                              lr=self.lr, mu=self.mu, lr_scale=1.0, first_step=False,
                              foreach=True, **self.settings)  # fmt: skip
        else:
            self.count.add_(1)
            tangent_adam_step_(self.params, grads, self.hvps, c["m"], c["v"], c["z"], c["zm"],
                               c["zv"], [], lr=self.lr, mu=self.mu, step=self.count,
                               lr_scale=1.0, foreach=True, **self.settings)  # fmt: skip


def count_step(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], num_tensors: int,
               warmup: int = 2, gpu_path: bool = True) -> OpCounter:  # fmt: skip
    """The ops of the step after ``warmup`` steps, for ``num_tensors`` tensors of 8 elements;
    ``gpu_path``: of the branch the foreach paths take on a GPU, run on CPU tensors."""
    from hyperlr_ext.functional._foreach_hd import list_ops_on

    with list_ops_on("cpu") if gpu_path else contextlib.nullcontext():
        return _count_step(make, num_tensors, warmup)


def _count_step(make, num_tensors: int, warmup: int) -> OpCounter:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(8, generator=gen).requires_grad_() for _ in range(num_tensors)]
    for p in params:
        p.grad = torch.randn(8, generator=gen) * 1e-3
    opt = make(params)
    for _ in range(warmup):
        opt.step()
    counter = OpCounter()
    with counter:
        opt.step()
    return counter


def per_extra_tensor(counts: dict[int, int]) -> float:
    """Growth of the count per added tensor between the smallest and largest sizes."""
    small, large = min(counts), max(counts)
    return (counts[large] - counts[small]) / (large - small)


def run(counts: tuple[int, ...] = COUNTS) -> list[dict]:
    rows = []
    for variant in variants():
        measured = {n: count_step(variant.make, n) for n in counts}
        rows.append({
            "name": variant.name,
            "baseline": variant.baseline,
            "ops": {n: c.launching for n, c in measured.items()},
            "views": {n: c.views for n, c in measured.items()},
            "per_extra_tensor": per_extra_tensor({n: c.launching for n, c in measured.items()}),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    counts = sorted(rows[0]["ops"])
    head = " | ".join(f"{n} tensors" for n in counts)
    lines = [
        f"| path | {head} | per extra tensor | views at {counts[-1]} |",
        "|---|" + "---|" * (len(counts) + 2),
    ]
    for row in rows:
        cells = " | ".join(str(row["ops"][n]) for n in counts)
        lines.append(
            f"| {row['name']} | {cells} | {row['per_extra_tensor']:.2f} | "
            f"{row['views'][counts[-1]]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = run(tuple(int(c) for c in args.counts.split(",")))
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
