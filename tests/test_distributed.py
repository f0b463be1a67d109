"""Distributed training with an existing engine (torch.distributed, gloo on CPU): DDP runs of
SGDHD, AdamHD, TLR and MARTHE, and FSDP2 (fully_shard, DTensor shards) runs of SGDHD, AdamHD, TLR
and MARTHE (finite-difference Hessian products: central, and forward on every other step), over
2 and 4 processes follow the
single-process trajectory (float64). Under FSDP2 the partial dot products of all tensors are
summed by exactly one all-reduce per step, on every rank.
DDP all-reduces the gradients before ``step()``, so every rank's HD optimizer sees the
full-batch gradient and takes the same step. MARTHE differentiates the closure's loss with
torch.autograd.grad, which DDP's hooks do not see: it averages its gradients and Hessian
products over the ranks itself (one all-reduce each).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hyperlr_ext as hx

pytestmark = pytest.mark.distributed
STEPS, BATCH = 8, 16  # the global batch splits evenly over 2 and 4 ranks


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()


INF_STEP = 4  # the "-skip" runs get an inf input here, in rank 0's share of the batch


def _batch(t, name=""):
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)
    if name.endswith("-skip") and t == INF_STEP:
        x[0, 0] = float("inf")
    return x, torch.randn(BATCH, 2, generator=gen, dtype=torch.float64)


def _make(name, params):
    if name.startswith("MARTHE"):
        settings = dict(lr=0.05, hyper_lr=1e-2, hyper_hyper_lr=1e-3, momentum=0.9)
        if "-adamw" in name:
            settings = dict(lr=0.01, hyper_lr=1e-3, inner="adamw", weight_decay=0.01)
        if "-FD" in name:
            settings["hvp"] = "finite_difference"
        if "-FWD" in name:  # the amortised products: a forward difference every other step
            settings.update(hvp="forward_difference", hvp_every=2)
        if name.endswith("-skip"):
            settings["skip_nonfinite"] = True
        return hx.MARTHE(params, **settings), None
    if name == "SGDHD":
        return hx.SGDHD(params, lr=0.05, hyper_lr=1e-2, momentum=0.9), None
    if name == "AdamHD":
        return hx.AdamHD(params, lr=1e-2, hyper_lr=1e-4), None
    if name.startswith("HyperLR"):
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        hx.HyperLR(opt, 1e-4, per_tensor=name.endswith("-per_tensor"))
        return opt, None
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return opt, hx.TLR(opt, update_every=2)


def _train(model, opt, sched, name, rank=0, world=1):
    """STEPS steps on this rank's share of each global batch; "-val" MARTHE runs take RT-HPO's
    validation objective (a fixed batch, also shared out over the ranks)."""
    val_x, val_y = (t[rank::world] for t in _batch(10**6))
    for t in range(STEPS):
        x, y = _batch(t, name)
        x, y = x[rank::world], y[rank::world]
        if isinstance(opt, hx.MARTHE):
            val_closure = None
            if "-val" in name:

                def val_closure():
                    return torch.nn.functional.mse_loss(model(val_x), val_y)

            opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y), val_closure)
            continue
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _result(model, opt):
    """The full weights (gathered from DTensor shards) and each group's LR."""
    hyper = hx.HyperLR.attached(opt)
    lrs = hyper.learned_lr if hyper is not None else [
        torch.as_tensor(g.get("learned_lr", g["lr"]), dtype=torch.float64) for g in opt.param_groups
    ]  # fmt: skip
    weights = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return [w.detach().clone() for w in weights] + lrs


@contextlib.contextmanager
def _process_group(rank, world, port):
    """This rank in a gloo group; torn down only after every rank is done with it. A rank whose
    work ended without error then exits at once: the interpreter's shutdown, which would destroy
    threads torch.distributed started, has now and then aborted a finished rank ("terminate
    called without an active exception"), failing a run whose results were all saved."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        yield
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank, world, names, port, path):
    with _process_group(rank, world, port):
        for name in names:
            model = torch.nn.parallel.DistributedDataParallel(_model())
            opt, sched = _make(name, model.parameters())
            _train(model, opt, sched, name, rank, world)
            torch.save(_result(model.module, opt), f"{path}.{name}.{rank}")


@pytest.fixture(scope="module")
def single_and_spawned(tmp_path_factory):
    """``get(worker, name, world)``: the single-process run's result, and what each of
    ``world`` spawned ranks of ``worker`` saved. One spawn per worker and world runs every name
    of that world in turn (process start-up and the group's set-up are most of a run's time)."""
    spawned = {}

    def get(worker, name, world):
        key = (worker.__name__, world)
        if key not in spawned:
            names = RUNS[key]
            path = tmp_path_factory.mktemp(f"{worker.__name__}-{world}") / "result"
            mp.spawn(worker, args=(world, names, _free_port(), str(path)), nprocs=world,
                     join=True)  # fmt: skip
            spawned[key] = {
                n: [torch.load(f"{path}.{n}.{rank}", weights_only=True) for rank in range(world)]
                for n in names
            }
        model = _model()
        opt, sched = _make(name, model.parameters())
        _train(model, opt, sched, name)
        return _result(model, opt), spawned[key][name]

    return get


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The runs of each spawn: (worker, world) -> names. Four ranks (oversubscribed on CI's two
# cores) for one optimizer per engine; every name runs on two.
DDP_NAMES = ["SGDHD", "AdamHD", "TLR", "MARTHE", "MARTHE-FD", "MARTHE-FWD"]
FSDP2_NAMES = ["SGDHD", "AdamHD", "TLR", "MARTHE-FD", "MARTHE-FD-val", "MARTHE-FD-adamw",
               "MARTHE-FD-skip", "MARTHE-FWD"]  # fmt: skip
RUNS = {
    ("_worker", 2): DDP_NAMES + ["HyperLR"],
    ("_worker", 4): ["SGDHD"],
    ("_fsdp_worker", 2): FSDP2_NAMES + ["HyperLR", "HyperLR-per_tensor"],
    ("_fsdp_worker", 4): ["MARTHE-FD"],
}
DDP_RUNS = [(name, 2) for name in DDP_NAMES] + [("SGDHD", 4)]
FSDP2_RUNS = [(name, 2) for name in FSDP2_NAMES] + [("MARTHE-FD", 4)]


@pytest.mark.parametrize(("name", "world"), DDP_RUNS)
def test_ddp_follows_the_single_process_trajectory(name, world, single_and_spawned):
    expected, saved = single_and_spawned(_worker, name, world)
    for got in saved:
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert expected[-1] != 0.05 and expected[-1] != 1e-2  # the LR moved


def test_ddp_with_hyper_lr_around_adamw_follows_the_single_process_trajectory(single_and_spawned):
    expected, saved = single_and_spawned(_worker, "HyperLR", 2)
    for got in saved:
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert expected[-1] != 1e-2  # the LR moved


# ---- FSDP2 (fully_shard: DTensor shards) ------------------------------------------------------


def _fsdp_worker(rank, world, names, port, path):
    from torch.distributed.fsdp import fully_shard

    with _process_group(rank, world, port):
        for name in names:
            model = _model()
            fully_shard(model)
            opt, sched = _make(name, model.parameters())
            calls = []
            original = dist.all_reduce

            def counting_all_reduce(*args, **kwargs):
                calls.append(1)
                return original(*args, **kwargs)

            step = opt.step

            def counted_step(*args, **kwargs):
                dist.all_reduce = counting_all_reduce
                try:
                    return step(*args, **kwargs)
                finally:
                    dist.all_reduce = original

            opt.step = counted_step
            _train(model, opt, sched, name, rank, world)
            torch.save(
                {"result": _result(model, opt), "all_reduces": len(calls)}, f"{path}.{name}.{rank}"
            )


@pytest.mark.parametrize(("name", "world"), FSDP2_RUNS)
def test_fsdp2_follows_the_single_process_trajectory_with_one_all_reduce_per_step(
    name, world, single_and_spawned
):
    expected, saved_by_rank = single_and_spawned(_fsdp_worker, name, world)
    for saved in saved_by_rank:
        # HD: the partial sums, once per step, on every rank (TLR's torch.optim.SGD has none; the
        # window ends add one each, outside the optimizer step). MARTHE: its dot products (and
        # |Z|^2 for the finite difference) once per step from the second on (the first has no
        # tangent yet), plus the inf/NaN flag of every step with skip_nonfinite.
        if name == "TLR":
            expected_reduces = 0
        elif name.startswith("MARTHE"):
            expected_reduces = STEPS - 1 + (STEPS if name.endswith("-skip") else 0)
        else:
            expected_reduces = STEPS
        assert saved["all_reduces"] == expected_reduces
        for a, b in zip(saved["result"], expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["HyperLR", "HyperLR-per_tensor"])
def test_fsdp2_with_hyper_lr_reduces_once_per_step(name, single_and_spawned):
    expected, saved_by_rank = single_and_spawned(_fsdp_worker, name, 2)
    for saved in saved_by_rank:
        assert saved["all_reduces"] == STEPS  # the pre-step hook's sums, one all-reduce a step
        for a, b in zip(saved["result"], expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (expected[-1] != 1e-2).all()


def _fsdp_marthe_worker(rank, world, port, path):
    from torch.distributed.fsdp import fully_shard

    with _process_group(rank, world, port):
        model = _model()
        fully_shard(model)
        messages = []
        for settings in (dict(), dict(hvp="finite_difference", fused=True)):
            try:
                hx.MARTHE(model.parameters(), lr=0.05, hyper_lr=1e-3, **settings)
                messages.append("")
            except ValueError as error:
                messages.append(str(error))
        torch.save({"messages": messages}, f"{path}.{rank}")


def test_marthe_under_fsdp2_refuses_double_backward_and_fused_clearly(tmp_path):
    path = tmp_path / "result"
    mp.spawn(_fsdp_marthe_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    for rank in range(2):
        autograd, fused = torch.load(f"{path}.{rank}", weights_only=True)["messages"]
        assert "FSDP2" in autograd and 'hvp="finite_difference"' in autograd
        assert "fused=True does not support DTensor (FSDP2)" in fused
