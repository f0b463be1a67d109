"""Generic tests that every row of the optimizer table gets (tests/optim_table.py)."""

from __future__ import annotations

import contextlib
import copy
import io
import pickle

import pytest
import torch
from optim_table import (
    IMPLS,
    ROW_CONFIG_IDS,
    ROW_CONFIGS,
    ROWS,
    list_ops_on_cpu,
    make_model,
    materialise_in_place,
    skip_unless_impl,
    train,
)
from sync_guard import NoSync

ROW_IDS = [row.name for row in ROWS]


def _params_equal(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _hyper(opt):
    return [(g["learned_lr"].clone(), g["effective_lr"].clone()) for g in opt.param_groups]


# ---------------------------------------------------------------- state_dict, copies, pickling
@pytest.mark.parametrize("row,cfg", ROW_CONFIGS, ids=ROW_CONFIG_IDS)
def test_state_dict_resume_is_bit_exact(row, cfg):
    model = make_model()
    opt = row.cls(model.parameters(), **cfg)
    train(model, opt, 4, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)

    train(model, opt, 5, seed=2)  # the uninterrupted run

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = row.cls(resumed.parameters(), **cfg)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 5, seed=2)

    assert _params_equal(model, resumed)
    for (lr_a, eff_a), (lr_b, eff_b) in zip(_hyper(opt), _hyper(opt2)):
        assert torch.equal(lr_a, lr_b) and torch.equal(eff_a, eff_b)
        assert lr_a.dtype == lr_b.dtype == torch.float64


def test_state_dict_keeps_fp32_hyper_state_for_bf16_params():
    """torch casts floating per-parameter state to the param dtype; our LR and step do not."""
    from hyperlr_ext import AdamHD

    model = make_model(dtype=torch.bfloat16)
    opt = AdamHD(model.parameters(), lr=0.01, hyper_lr=1e-3, capturable=True)
    train(model, opt, 2)
    opt2 = AdamHD(make_model(dtype=torch.bfloat16).parameters(), lr=0.01, capturable=True)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["learned_lr"].dtype == torch.float32
    for state in opt2.state.values():
        assert state["step"].dtype == torch.float32
    assert torch.equal(opt2.param_groups[0]["learned_lr"], opt.param_groups[0]["learned_lr"])


@pytest.mark.parametrize("row,cfg", ROW_CONFIGS, ids=ROW_CONFIG_IDS)
def test_deepcopy_and_pickle_continue_identically(row, cfg):
    model = make_model()
    opt = row.cls(model.parameters(), **cfg)
    train(model, opt, 3)
    for clone_fn in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        model_copy = copy.deepcopy(model)
        opt_copy = row.cls(model_copy.parameters(), **cfg)
        opt_copy.load_state_dict(clone_fn(opt).state_dict())
        ref_model = copy.deepcopy(model)
        ref_opt = row.cls(ref_model.parameters(), **cfg)
        ref_opt.load_state_dict(opt.state_dict())
        train(model_copy, opt_copy, 3, seed=5)
        train(ref_model, ref_opt, 3, seed=5)
        assert _params_equal(model_copy, ref_model)
    clone = copy.deepcopy(opt)
    assert clone.defaults == opt.defaults
    assert torch.equal(clone.param_groups[0]["learned_lr"], opt.param_groups[0]["learned_lr"])
    assert clone.param_groups[0]["learned_lr"] is not opt.param_groups[0]["learned_lr"]


@pytest.mark.parametrize("row,cfg", ROW_CONFIGS, ids=ROW_CONFIG_IDS)
def test_deepcopy_copies_all_public_attrs(row, cfg):
    """torch.optim's contract: a deepcopy has every public attribute of the optimizer, before
    and after steps (``nonfinite_step`` included), with equal values."""
    model = make_model()
    opt = row.cls(model.parameters(), skip_nonfinite=True, **cfg)

    def public(o):
        return {k: v for k, v in vars(o).items() if not k.startswith("_")}

    for _ in range(2):
        clone = copy.deepcopy(opt)
        assert public(clone).keys() == public(opt).keys()
        for key, value in public(opt).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(public(clone)[key], value), key
        train(model, opt, 2)
    assert isinstance(opt.nonfinite_step, torch.Tensor)
    assert clone._step_supports_amp_scaling == opt._step_supports_amp_scaling


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_fused_accepts_meta_params_until_step(row):
    """torch.optim's contract for deferred initialisation: fused=True takes parameters on the
    meta device; step() refuses them with torch's message; once ``to_empty`` has materialised
    them in place the optimizer steps exactly like one built on the materialised parameters."""
    skip_unless_impl(row, "fused")
    with torch.device("meta"):
        model = make_model()
    opt = row.cls(model.parameters(), lr=0.01, fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(
        RuntimeError,
        match=r"^`fused=True` requires all the params to be floating point Tensors of supported "
        "devices",
    ):
        opt.step()
    materialise_in_place(model)
    reference = make_model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            p.copy_(q)
    ref_opt = row.cls(reference.parameters(), lr=0.01, fused=True)
    train(model, opt, 3)
    train(reference, ref_opt, 3)
    assert _params_equal(model, reference)
    assert torch.equal(opt.param_groups[0]["learned_lr"], ref_opt.param_groups[0]["learned_lr"])


# ---------------------------------------------------------------- param groups
@pytest.mark.parametrize("row,cfg", ROW_CONFIGS, ids=ROW_CONFIG_IDS)
def test_param_groups_are_independent(row, cfg):
    """Two groups in one optimizer == two optimizers, one per group."""
    model = make_model()
    twin = copy.deepcopy(model)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    together = row.cls(
        [{"params": first}, {"params": second, "lr": cfg["lr"] * 3, "hyper_lr": 0.0}], **cfg
    )
    separate = [
        row.cls(twin[0].parameters(), **cfg),
        row.cls(twin[2].parameters(), **{**cfg, "lr": cfg["lr"] * 3, "hyper_lr": 0.0}),
    ]
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
        for m, opts in ((model, [together]), (twin, separate)):
            for o in opts:
                o.zero_grad()
            m(x).pow(2).mean().backward()
            for o in opts:
                o.step()
    torch.testing.assert_close(list(model.parameters()), list(twin.parameters()), rtol=0, atol=0)
    assert torch.equal(
        together.param_groups[1]["learned_lr"].reshape(-1)[0],
        torch.tensor(cfg["lr"] * 3, dtype=torch.float64),
    )
    torch.testing.assert_close(
        together.param_groups[0]["learned_lr"], separate[0].param_groups[0]["learned_lr"]
    )


@pytest.mark.parametrize("row,cfg", ROW_CONFIGS, ids=ROW_CONFIG_IDS)
def test_add_param_group(row, cfg):
    model = make_model()
    extra = torch.nn.Linear(2, 1).double()
    opt = row.cls(model.parameters(), **cfg)
    train(model, opt, 2)
    opt.add_param_group({"params": extra.parameters(), "lr": 0.002})
    group = opt.param_groups[1]
    assert group["initial_lr"] == 0.002
    assert torch.all(group["learned_lr"] == 0.002)
    for key, value in row.cls(extra.parameters(), **cfg).defaults.items():
        if key != "lr":
            assert group[key] == value
    before = [p.clone() for p in extra.parameters()]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        extra(model(torch.randn(4, 5, generator=gen, dtype=torch.float64))).sum().backward()
        opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, extra.parameters()))


# ---------------------------------------------------------------- implementations agree
@pytest.mark.parametrize("branch", ["cpu", "gpu"])
@pytest.mark.parametrize("row,cfg", ROW_CONFIGS, ids=ROW_CONFIG_IDS)
def test_for_loop_equals_foreach(row, cfg, branch):
    """The foreach path in both its branches (per-tensor sums on the CPU; the constant-launch
    list ops of a GPU, run on CPU tensors) follows the for-loop's trajectory."""
    models = [make_model(), make_model()]
    opts = [
        row.cls(models[0].parameters(), foreach=False, **cfg),
        row.cls(models[1].parameters(), foreach=True, **cfg),
    ]
    train(models[0], opts[0], 8, seed=4)
    with list_ops_on_cpu() if branch == "gpu" else contextlib.nullcontext():
        train(models[1], opts[1], 8, seed=4)
    torch.testing.assert_close(
        list(models[0].parameters()), list(models[1].parameters()), rtol=1e-13, atol=1e-15
    )
    torch.testing.assert_close(
        opts[0].param_groups[0]["learned_lr"],
        opts[1].param_groups[0]["learned_lr"],
        rtol=1e-13,
        atol=0,
    )


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("index", range(6))
def test_hyper_lr_zero_reproduces_torch(row, index):
    """With hyper_lr=0 the trajectory is torch.optim's, to 1e-12 in float64."""
    if index >= len(row.torch_equivalents):
        pytest.skip("no such equivalent")
    torch_cls, kwargs = row.torch_equivalents[index]
    ours_kwargs = dict(kwargs)
    if torch_cls is torch.optim.AdamW:
        ours_kwargs["decoupled_weight_decay"] = True
    for impl in ("for-loop", "foreach", "fused"):
        if impl == "fused" and not row.fused:
            continue
        model, ref = make_model(), make_model()
        opt = row.cls(model.parameters(), hyper_lr=0.0, **IMPLS[impl], **ours_kwargs)
        ref_opt = torch_cls(ref.parameters(), foreach=impl == "foreach", **kwargs)
        train(model, opt, 40, seed=6)
        train(ref, ref_opt, 40, seed=6)
        torch.testing.assert_close(
            list(model.parameters()), list(ref.parameters()), rtol=1e-12, atol=1e-12
        )


# ---------------------------------------------------------------- unusual parameters
@pytest.mark.parametrize("row,cfg", ROW_CONFIGS, ids=ROW_CONFIG_IDS)
@pytest.mark.parametrize("impl", ["default", "fused"])
def test_frozen_zero_size_and_non_contiguous_params(row, cfg, impl):
    skip_unless_impl(row, impl)
    cfg = dict(cfg, **IMPLS[impl]) if impl == "fused" else cfg
    torch.manual_seed(0)
    base = torch.randn(3, 4, dtype=torch.float64)
    non_contiguous = base.t().detach().requires_grad_()  # a (4, 3) leaf with strides (1, 4)
    contiguous = base.t().contiguous().requires_grad_()
    frozen = torch.randn(3, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(0, 2, dtype=torch.float64, requires_grad=True)
    assert not non_contiguous.is_contiguous()
    opt_a = row.cls([non_contiguous, frozen, empty], **cfg)
    opt_b = row.cls([contiguous], **cfg)
    frozen_before = frozen.detach().clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(3, generator=gen, dtype=torch.float64)
        for w, o, extra in ((non_contiguous, opt_a, empty.sum()), (contiguous, opt_b, 0)):
            o.zero_grad()
            ((w @ x).pow(2).sum() + extra).backward()
            o.step()
    assert frozen.grad is None and torch.equal(frozen, frozen_before)
    assert empty.shape == (0, 2)
    torch.testing.assert_close(non_contiguous, contiguous, rtol=1e-14, atol=0)
    if not cfg.get("per_tensor"):
        torch.testing.assert_close(
            opt_a.param_groups[0]["learned_lr"],
            opt_b.param_groups[0]["learned_lr"],
            rtol=1e-14,
            atol=0,
        )


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_sparse_and_complex_gradients_rejected_without_change(row, layout):
    cfg = row.configs[0]
    dense = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(5, 3, dtype=torch.float64)
    # A CSR gradient comes with a CSR parameter (autograd refuses to mix them).
    sparse = torch.randn(5, 3, dtype=torch.float64) if layout == "coo" else eye.to_sparse_csr()
    sparse.requires_grad_()
    opt = row.cls([dense, sparse], **cfg)
    before = (dense.detach().clone(), sparse.detach().clone(), _hyper(opt))
    dense.grad = torch.ones_like(dense)
    sparse.grad = eye.to_sparse() if layout == "coo" else eye.to_sparse_csr()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense, before[0])
    assert torch.equal(sparse.to_dense(), before[1].to_dense())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(before[2], _hyper(opt)))
    assert len(opt.state) == 0

    z = torch.randn(3, dtype=torch.complex128, requires_grad=True)
    opt = row.cls([z], **cfg)
    z.grad = torch.ones_like(z)
    with pytest.raises(ValueError, match="complex"):
        opt.step()
    assert len(opt.state) == 0


# ---------------------------------------------------------------- invariants
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("multiplicative", [False, True])
def test_lr_never_negative(row, multiplicative):
    """Gradients that flip sign every step push the LR down hard; it must stop at 0."""
    w = torch.ones(10, dtype=torch.float64, requires_grad=True)
    opt = row.cls([w], lr=0.1, hyper_lr=1e6, multiplicative=multiplicative)
    seen = []
    for t in range(6):
        w.grad = torch.full_like(w, (-1.0) ** t * 10.0)
        opt.step()
        seen.append(opt.param_groups[0]["learned_lr"].item())
        assert opt.param_groups[0]["effective_lr"].item() >= 0
    assert min(seen) == 0.0  # the clamp was exercised, not just never needed


@pytest.mark.parametrize("row,cfg", ROW_CONFIGS, ids=ROW_CONFIG_IDS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_step_never_syncs(row, cfg, impl):
    skip_unless_impl(row, impl)
    model = make_model()
    opt = row.cls(model.parameters(), **IMPLS[impl], **cfg)
    gen = torch.Generator().manual_seed(0)
    with NoSync():  # the mode itself: check it catches .item()
        with pytest.raises(AssertionError, match="sync"):
            torch.ones(()).item()
    for _ in range(3):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        with NoSync():
            opt.step(val_closure=lambda: model(x * 0.5).pow(2).mean())


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_invalid_arguments_name_themselves(row):
    for kwargs, name in row.invalid:
        params = [torch.zeros(2, requires_grad=True)]
        with pytest.raises(ValueError, match=name):
            row.cls(params, **kwargs)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_constructor_checks_arguments_before_params(row):
    def params():
        raise AssertionError("params touched before the arguments were checked")
        yield

    with pytest.raises(ValueError, match="lr"):
        row.cls(params(), lr=-1.0)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_fused_request_fails_clearly(row):
    """fused=True is honoured or refused with a clear error, never silently downgraded."""
    if not row.fused:
        with pytest.raises(RuntimeError, match="fused"):
            row.cls([torch.zeros(2, requires_grad=True)], fused=True)
    else:
        skip_unless_impl(row, "fused")
        row.cls([torch.zeros(2, requires_grad=True)], fused=True)
        row.cls([torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)], fused=True)
        for dtypes in (
            [torch.float16, torch.bfloat16],
            [torch.float32, torch.float64],
            [torch.int64],
        ):
            params = [torch.zeros(2, dtype=d, requires_grad=d.is_floating_point) for d in dtypes]
            with pytest.raises(RuntimeError, match="fused=True"):
                row.cls(params, fused=True)
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        row.cls([torch.zeros(2, requires_grad=True)], fused=True, foreach=True)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_capturable_accepted_and_params_on_one_device(row):
    row.cls([torch.zeros(2, requires_grad=True)], capturable=True)
    meta = torch.zeros(2, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="one device"):
        row.cls([torch.zeros(2, requires_grad=True), meta])


# ---------------------------------------------------------------- step protocol
@pytest.mark.parametrize("row,cfg", ROW_CONFIGS, ids=ROW_CONFIG_IDS)
def test_closure_runs_first_and_skipped_batch_is_noop(row, cfg):
    model = make_model()
    opt = row.cls(model.parameters(), **cfg)
    x = torch.randn(8, 5, dtype=torch.float64)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = [p.clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    opt.zero_grad(set_to_none=True)
    snapshot = copy.deepcopy(opt.state_dict())
    params = [p.clone() for p in model.parameters()]
    assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()
    assert after["param_groups"][0]["hd_prev_scale"] == snapshot["param_groups"][0]["hd_prev_scale"]
    assert torch.equal(
        after["param_groups"][0]["learned_lr"], snapshot["param_groups"][0]["learned_lr"]
    )


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_step_hooks_fire_once_per_step(row):
    model = make_model()
    opt = row.cls(model.parameters(), **row.configs[0])
    fired = []
    opt.register_step_pre_hook(lambda *a: fired.append("pre"))
    opt.register_step_post_hook(lambda *a: fired.append("post"))
    train(model, opt, 2)
    assert fired == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_val_closure_errors_are_clear(row):
    model = make_model()
    opt = row.cls(model.parameters(), **row.configs[0])
    model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(val_closure=lambda: model(torch.randn(2, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="require grad"):
        opt.step(val_closure=lambda: torch.tensor(1.0))


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_messages_begin_like_torch(row):
    """Where torch.optim has a message for a case, ours starts the same way."""
    p = [torch.zeros(2, requires_grad=True)]
    cases = [
        (dict(lr=-1.0), r"^Invalid learning rate: -1.0"),
        (dict(weight_decay=-0.1), r"^Invalid weight_decay value: -0.1"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), r"^Tensor lr must be 1-element"),
        (dict(lr=torch.tensor(1e-3)), r"^lr as a Tensor is not supported"),
        (
            dict(lr=torch.tensor(1e-3), foreach=True),
            r"^lr as a Tensor is not supported for capturable=False and foreach=True",
        ),
    ]
    if row.name == "SGDHD":
        cases.append((dict(momentum=-0.5), r"^Invalid momentum value: -0.5"))
    else:
        cases += [
            (dict(betas=(1.0, 0.0)), r"^Invalid beta parameter at index 0: 1.0"),
            (dict(betas=(0.9, -0.1)), r"^Invalid beta parameter at index 1: -0.1"),
            (dict(eps=-1.0), r"^Invalid epsilon value: -1.0"),
            (dict(betas=(0.9, torch.tensor(0.99))), r"both floats or both Tensors"),
            (dict(betas=(torch.tensor(0.9), torch.tensor(0.99))), r"^betas\[0\] as a Tensor"),
        ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            row.cls(p, **kwargs)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_load_state_dict_with_python_number_step(row):
    """Checkpoints from torch < 1.12 keep "step" as a Python number."""
    model, twin = make_model(), make_model()
    opt = row.cls(model.parameters(), **row.configs[0])
    train(model, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        if "step" in state:
            state["step"] = float(state["step"])
    twin.load_state_dict(model.state_dict())
    opt2 = row.cls(twin.parameters(), **row.configs[0])
    opt2.load_state_dict(saved)
    train(model, opt, 2, seed=9)
    train(twin, opt2, 2, seed=9)
    assert _params_equal(model, twin)
