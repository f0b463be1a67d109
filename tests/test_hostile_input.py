"""Hostile input, property-based (hypothesis): constructor arguments anywhere on the real line
(NaN and inf included) are accepted exactly when they are in range and otherwise rejected by a
ValueError naming the argument; random parameter shapes (zero-size, 0-dim) and dtypes train;
empty and duplicate parameter lists, and parameters that change dtype after construction, are
rejected clearly, and a rejected step changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sync_guard import NoSync

import hyperlr_ext as hx

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=64)
BIG = 3.4028234663852886e38  # float32's largest: the learned state is float32
# argument -> (accepted range as a predicate, the constructor to call)
ARGUMENTS = {
    ("SGDHD", "lr"): lambda v: 0 <= v <= BIG,
    ("SGDHD", "hyper_lr"): lambda v: 0 <= v <= BIG,
    ("SGDHD", "momentum"): lambda v: 0 <= v <= BIG,
    ("SGDHD", "weight_decay"): lambda v: 0 <= v <= BIG,
    ("AdamHD", "lr"): lambda v: 0 <= v <= BIG,
    ("AdamHD", "eps"): lambda v: 0 <= v <= BIG,
    ("AdamHD", "weight_decay"): lambda v: 0 <= v <= BIG,
    ("MARTHE", "lr"): lambda v: 0 <= v <= BIG,
    ("MARTHE", "hyper_lr"): lambda v: 0 <= v <= BIG,
    ("MARTHE", "hyper_hyper_lr"): lambda v: 0 <= v <= BIG,
    ("MARTHE", "mu"): lambda v: 0 <= v <= 1,
    ("MARTHE", "dampening"): lambda v: 0 <= v <= 1,
    ("TLR", "gamma"): lambda v: 0 < v <= 1,
    ("TLR", "max_factor"): lambda v: 1 <= v <= BIG,
    ("MLRSNet", "gamma"): lambda v: 0 < v <= BIG,
    ("MLRSNet", "meta_lr"): lambda v: 0 <= v <= BIG,
}


def _construct(cls_name: str, arg: str, value: float):
    params = [torch.nn.Parameter(torch.randn(3))]
    if cls_name in ("TLR", "MLRSNet"):
        opt = torch.optim.SGD(params, lr=0.1)
        extra = {"update_every": 2} if cls_name == "TLR" else {}
        return getattr(hx, cls_name)(opt, **{arg: value}, **extra)
    return getattr(hx, cls_name)(params, **{arg: value})


@settings(max_examples=60, deadline=None, derandomize=True)
@given(key=st.sampled_from(sorted(ARGUMENTS)), value=ANY_FLOAT)
@example(key=("AdamHD", "lr"), value=3.5e38)  # finite, but beyond the float32 learned LR
@example(key=("MARTHE", "mu"), value=float("nan"))
def test_arguments_are_accepted_exactly_in_range(key, value):
    cls_name, arg = key
    if ARGUMENTS[key](value):
        _construct(cls_name, arg, value)
    else:
        with pytest.raises(ValueError, match=arg):
            _construct(cls_name, arg, value)


SHAPES = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=4)
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
MAKERS = {
    "SGDHD": lambda p: hx.SGDHD(p, lr=0.01, hyper_lr=1e-3, momentum=0.9),
    "AdamHD": lambda p: hx.AdamHD(p, lr=1e-3, hyper_lr=1e-7),
    "MARTHE": lambda p: hx.MARTHE(p, lr=0.01, hyper_lr=1e-4, momentum=0.5),
}


@settings(max_examples=25, deadline=None, derandomize=True)
@given(shapes=SHAPES, dtype=DTYPES, name=st.sampled_from(sorted(MAKERS)),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_any_shapes_and_dtypes_train(shapes, dtype, name, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = MAKERS[name](params)

    def loss():
        return sum((p.float() ** 2).sum() for p in params) + torch.zeros((), requires_grad=True)

    for _ in range(3):
        if name == "MARTHE":
            opt.step(loss)
        else:
            opt.zero_grad()
            loss().backward()
            opt.step()
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p.float()).all()
    for group in opt.param_groups:
        assert torch.isfinite(group["effective_lr"]).all() and (group["effective_lr"] >= 0).all()


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_empty_duplicate_and_non_tensor_params_are_rejected(name):
    with pytest.raises(ValueError, match="empty parameter list"):
        MAKERS[name]([])
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        MAKERS[name]([{"params": [p]}, {"params": [p]}])
    with pytest.raises(TypeError, match="Tensors"):
        MAKERS[name]([1.0])


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_dtype_change_after_construction_is_refused_without_change(name):
    model = torch.nn.Linear(3, 2)
    opt = MAKERS[name](model.parameters())
    x = torch.randn(4, 3)

    def loss():
        return model(x.to(model.weight.dtype)).pow(2).mean()

    def step():
        if name == "MARTHE":
            opt.step(loss)
        else:
            opt.zero_grad()
            loss().backward()
            opt.step()

    step()
    step()
    model.double()
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError, match="changed dtype or device after the optimizer was built"):
        step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    after = opt.state_dict()
    for key, value in state["state"].items():
        for k, v in value.items():
            assert torch.equal(v, after["state"][key][k]) if torch.is_tensor(v) else v == after[
                "state"][key][k]  # fmt: skip
    opt.load_state_dict(opt.state_dict())  # the documented way out: the state follows the params
    step()


@pytest.mark.parametrize(
    "impl", [dict(), dict(foreach=True), dict(foreach=False, fused=False)],
    ids=["default", "foreach", "loop"],
)  # fmt: skip
@pytest.mark.parametrize("name", ["SGDHD", "AdamHD"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skip_nonfinite_leaves_everything_unchanged_without_a_sync(name, impl, bad):
    """skip_nonfinite=True: a step whose gradients hold inf/NaN changes neither weights, nor
    state, nor the learned LR, on every path; ``nonfinite_step`` says so; no host sync."""
    extra = dict(momentum=0.9) if name == "SGDHD" else {}
    model = torch.nn.Linear(3, 2).double()
    opt = getattr(hx, name)(model.parameters(), lr=0.01, hyper_lr=1e-3, skip_nonfinite=True,
                            **extra, **impl)  # fmt: skip
    x = torch.randn(4, 3, dtype=torch.float64)

    def step(scale):
        opt.zero_grad()
        (model(x).pow(2).mean() * scale).backward()
        with NoSync():
            opt.step()

    step(1.0)
    step(1.0)
    before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
    step(bad)
    assert float(opt.nonfinite_step) == 1.0
    for a, b in zip(before[0], model.parameters()):
        assert torch.equal(a, b)
    after = opt.state_dict()
    for key, value in before[1]["state"].items():
        for k, v in value.items():
            assert torch.equal(v, after["state"][key][k])
    assert torch.equal(before[1]["param_groups"][0]["learned_lr"],
                       after["param_groups"][0]["learned_lr"])  # fmt: skip
    step(1.0)
    assert float(opt.nonfinite_step) == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
