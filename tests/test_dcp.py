"""Distributed checkpoints (torch.distributed.checkpoint, DCP) under FSDP2, gloo on CPU: every
optimizer and scheduler of the package saved after K steps on N ranks and loaded on M ranks
(2 -> 4, 4 -> 2, and 1 -> 2 from an unsharded run), then continued, follows one uninterrupted
single-process run (float64, 1e-10). A full state from ``get_state_dict(..., full_state_dict=True)``
on 2 ranks also continues exactly in a single process, and on 2 ranks again.

The recipe under test is the one in the README: ``get_state_dict(model, opt)`` (which creates the
state of a fresh optimizer through its own zero-gradient step), the scheduler's ``state_dict()``
beside it, ``dcp.save``; to resume, the same dicts of a freshly built model, optimizer and
scheduler as the template for ``dcp.load``, then ``set_state_dict`` and the scheduler's
``load_state_dict``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from test_distributed import _batch, _free_port, _model, _process_group
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

import hyperlr_ext as hx

pytestmark = pytest.mark.distributed
STEPS, SAVE_AT = 8, 3  # SAVE_AT: mid-window for TLR, a snapshot pending for MLR-SNet

CASES = {
    "SGDHD-momentum": lambda ps: hx.SGDHD(ps, lr=0.05, hyper_lr=1e-2, momentum=0.9),
    "SGDHD-nesterov": lambda ps: hx.SGDHD(
        ps, lr=0.05, hyper_lr=1e-2, momentum=0.9, nesterov=True
    ),  # fmt: skip
    "AdamHD-adamw": lambda ps: hx.AdamHD(
        ps, lr=1e-2, hyper_lr=1e-4, weight_decay=0.01, decoupled_weight_decay=True
    ),  # fmt: skip
    "AdamHD-amsgrad": lambda ps: hx.AdamHD(ps, lr=1e-2, hyper_lr=1e-4, amsgrad=True),
    "MARTHE-sgd": lambda ps: hx.MARTHE(
        ps, lr=0.05, hyper_lr=1e-2, hyper_hyper_lr=1e-3, momentum=0.9, hvp="finite_difference"
    ),  # fmt: skip
    "MARTHE-adam": lambda ps: hx.MARTHE(
        ps, lr=0.01, hyper_lr=1e-3, inner="adam", hvp="finite_difference"
    ),  # fmt: skip
    "TLR": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "MLRSNet": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
}


def _make(name, model):
    opt = CASES[name](model.parameters())
    if name == "TLR":
        return opt, hx.TLR(opt, update_every=2)
    if name == "MLRSNet":
        torch.manual_seed(1)  # the net's initial weights, equal on every rank
        return opt, hx.MLRSNet(opt, gamma=0.1, meta_every=2, meta_lr=1e-2)
    return opt, None


def _global_mean(loss, world):
    """The loss of the whole batch from this rank's share (MLR-SNet's input must be the same on
    every rank, as in the unsharded run)."""
    if world == 1:
        return loss.detach()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / world


def _train(name, model, opt, sched, steps, rank=0, world=1):
    val_x, val_y = (t[rank::world] for t in _batch(10**6))
    mse = torch.nn.functional.mse_loss
    for t in steps:
        x, y = (v[rank::world] for v in _batch(t))
        if isinstance(opt, hx.MARTHE):
            opt.step(lambda x=x, y=y: mse(model(x), y))
            continue
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        if isinstance(sched, hx.MLRSNet):
            sched.step(_global_mean(loss, world), val_closure=lambda: mse(model(val_x), val_y))
        elif sched is not None:
            sched.step()


def _result(model, opt):
    """The whole weights and each group's LR (learned, or as the scheduler set it)."""
    lrs = [torch.as_tensor(g.get("learned_lr", g["lr"]), dtype=torch.float64)
           for g in opt.param_groups]  # fmt: skip
    weights = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return [w.detach().clone() for w in weights] + lrs


def _state(model, opt, sched, options=None):
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    if sched is not None:
        state["sched"] = sched.state_dict()
        if options is not None and options.full_state_dict:  # the whole tensors, on every rank
            state["sched"] = tree_map_only(DTensor, DTensor.full_tensor, state["sched"])
    return state


def _restore(model, opt, sched, state, options=None):
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)  # fmt: skip
    if sched is not None:
        sched.load_state_dict(state["sched"])


def _fresh(name, world):
    model = _model()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    return (model, *_make(name, model))


def _save(name, world, path, rank=0):
    """K steps, then DCP's save (and, sharded, the full state on rank 0)."""
    model, opt, sched = _fresh(name, world)
    _train(name, model, opt, sched, range(SAVE_AT), rank, world)
    dcp.save(_state(model, opt, sched), checkpoint_id=f"{path}/{name}-{world}")
    if world > 1:
        full = _state(model, opt, sched, StateDictOptions(full_state_dict=True))
        if rank == 0:
            torch.save(full, f"{path}/{name}-full.pt")


def _resume(name, world, path, saved_world, rank=0):
    """A fresh model, optimizer and scheduler, loaded from the checkpoint of ``saved_world``
    ranks, then the remaining steps."""
    model, opt, sched = _fresh(name, world)
    if saved_world == "full":  # the whole state gathered on 2 ranks, loaded into the shards
        full = torch.load(f"{path}/{name}-full.pt", weights_only=False)
        _restore(model, opt, sched, full, StateDictOptions(full_state_dict=True))
    else:
        state = _state(model, opt, sched)  # the template: DCP loads into these tensors
        dcp.load(state, checkpoint_id=f"{path}/{name}-{saved_world}")
        _restore(model, opt, sched, state)
    _train(name, model, opt, sched, range(SAVE_AT, STEPS), rank, world)
    return _result(model, opt)


def _worker(rank, world, jobs, port, path):
    with _process_group(rank, world, port):
        results = {}
        for job, name, saved_world in jobs:
            if job == "save":
                _save(name, world, path, rank)
            else:
                results[f"{name}:{saved_world}->{world}"] = _resume(
                    name, world, path, saved_world, rank
                )
        torch.save(results, f"{path}/results-{world}.{rank}")


def _spawn(world, jobs, path):
    mp.spawn(_worker, args=(world, jobs, _free_port(), str(path)), nprocs=world, join=True)
    return [torch.load(f"{path}/results-{world}.{rank}", weights_only=True)
            for rank in range(world)]  # fmt: skip


def _assert_same(got, expected):
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dcp_reshards_every_optimizer_and_scheduler(tmp_path):
    names = list(CASES)
    expected = {}
    for name in names:
        model, opt, sched = _fresh(name, 1)
        _train(name, model, opt, sched, range(STEPS))
        expected[name] = _result(model, opt)
        _save(name, 1, tmp_path)  # the unsharded checkpoint (no process group)
    _spawn(2, [("save", n, None) for n in names], tmp_path)
    on_four = _spawn(4, [("load", n, 2) for n in names] + [("save", n, None) for n in names],
                     tmp_path)  # fmt: skip
    on_two = _spawn(2, [("load", n, w) for n in names for w in (4, 1, "full")], tmp_path)
    for name in names:
        for results, routes in [(r, ("2->4",)) for r in on_four] + [
            (r, ("4->2", "1->2", "full->2")) for r in on_two
        ]:
            for route in routes:
                _assert_same(results[f"{name}:{route}"], expected[name])
        # The full state gathered on 2 ranks continues in one process.
        model, opt, sched = _fresh(name, 1)
        full = torch.load(tmp_path / f"{name}-full.pt", weights_only=False)
        _restore(model, opt, sched, full, StateDictOptions(full_state_dict=True))
        _train(name, model, opt, sched, range(SAVE_AT, STEPS))
        _assert_same(_result(model, opt), expected[name])


@pytest.mark.parametrize("name", list(CASES))
def test_dcp_state_initialisation_moves_nothing(name):
    """``get_state_dict`` on a fresh optimizer steps it once with zero gradients and LR 0 (DCP's
    state initialisation): every kind accepts that step and moves no weight and no LR, and the
    state it creates has the keys and shapes the first real step creates."""
    model, opt, sched = _fresh(name, 1)
    before = _result(model, opt)
    state = _state(model, opt, sched)
    _assert_same(_result(model, opt), before)
    assert all(p.grad is None for p in model.parameters())
    stepped_model, stepped_opt, stepped_sched = _fresh(name, 1)
    _train(name, stepped_model, stepped_opt, stepped_sched, range(1))
    stepped = _state(stepped_model, stepped_opt, stepped_sched)["optim"]["state"]
    assert {k: sorted(v) for k, v in state["optim"]["state"].items()} == {
        k: sorted(v) for k, v in stepped.items()
    }
    for key, values in stepped.items():
        for field, value in values.items():
            assert state["optim"]["state"][key][field].shape == value.shape


def test_marthe_without_closure_still_refused_outside_dcp_initialisation():
    model = _model()
    opt = hx.MARTHE(model.parameters(), lr=0.05, hyper_lr=1e-2)
    with pytest.raises(ValueError, match="need a closure"):
        opt.step(None)
    assert not opt.state
