"""Checkpoints: every optimizer and scheduler saved in the middle of training, loaded in a new
process with torch.load(weights_only=True), continues bit-identically to the uninterrupted run;
a state_dict of another optimizer or configuration is refused with a clear message and changes
nothing."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hyperlr_ext as hx

sys.path.insert(0, str(Path(__file__).parent))
import checkpoint_cases as cases  # noqa: E402


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Every case trained, checkpointed, trained on; then one new process resumes all of them
    from their checkpoints (loading with weights_only=True). name -> (expected, got)."""
    directory = tmp_path_factory.mktemp("resume")
    expected, arguments = {}, []
    for name in cases.CASES:
        model, opt, sched = cases.build(name)
        cases.train(name, model, opt, sched, cases.STEPS_BEFORE, 0)
        checkpoint = directory / f"{name}.pt"
        cases.save(checkpoint, model, opt, sched)
        cases.train(name, model, opt, sched, cases.STEPS_AFTER, cases.STEPS_BEFORE)
        expected[name] = cases.snapshot(model, opt)
        arguments += [name, str(checkpoint), str(directory / f"{name}-resumed.pt")]
    result = subprocess.run(
        [sys.executable, str(Path(cases.__file__)), *arguments],
        cwd=directory, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {
        name: (expected[name], torch.load(directory / f"{name}-resumed.pt", weights_only=True))
        for name in cases.CASES
    }


@pytest.mark.parametrize("name", list(cases.CASES))
def test_resume_in_a_new_process_is_bit_identical(name, resumed):
    expected, got = resumed[name]
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def _state(opt):
    return copy.deepcopy(opt.state_dict())


def _same(a, b):
    """Exact equality of nested state (tensors by value and dtype)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.parametrize(
    "source, target, match",
    [
        ("SGDHD", "AdamHD", "not saved by AdamHD"),
        ("AdamHD", "SGDHD", "not saved by SGDHD"),
        ("MARTHE", "MARTHE-adam", "inner="),
        ("SGDHD", "SGDHD-foreach-per-tensor", "per_tensor="),
        ("SGDHD", "MARTHE", "not saved by MARTHE"),
    ],
)
def test_state_dict_of_another_configuration_is_refused_unchanged(source, target, match):
    model, opt, sched = cases.build(source)
    cases.train(source, model, opt, sched, 3, 0)
    saved = opt.state_dict()
    model2, opt2, sched2 = cases.build(target)
    cases.train(target, model2, opt2, sched2, 2, 0)
    before = _state(opt2)
    with pytest.raises(ValueError, match=match):
        opt2.load_state_dict(saved)
    assert _same(_state(opt2), before)


def test_scheduler_state_dicts_of_other_shapes_are_refused():
    model, opt, sched = cases.build("TLR")
    cases.train("TLR", model, opt, sched, 4, 0)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="snapshots"):
        hx.TLR(other, update_every=3).load_state_dict(sched.state_dict())
    model, opt, sched = cases.build("MLRSNet")
    with pytest.raises(ValueError, match="hidden size"):
        hx.MLRSNet(opt, hidden_size=5).load_state_dict(sched.state_dict())
