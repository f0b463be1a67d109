"""The compiled ops (csrc/) and their loader hyperlr_ext._ops.

Tests that need the compiled extension skip, with its reason, when it is unavailable; with
HYPERLR_REQUIRE_EXTENSION=1 (set by `make test` and CI) test_extension_loaded fails instead, so a
broken build cannot pass as a run of skips. GPU tests carry @pytest.mark.gpu and skip without CUDA.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.library import opcheck

from hyperlr_ext import _ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CHUNK_SIZE = 65536  # csrc/hd_math.h kChunkSize
LANES = 512  # csrc/hd_math.h kLanes

needs_extension = pytest.mark.skipif(
    not _ops.EXTENSION_AVAILABLE,
    reason=f"compiled extension unavailable: {_ops.EXTENSION_ERROR}",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# test_cuda_kernel_compiled fails for a CPU-only build on a GPU machine; the rest skip.
needs_cuda_kernels = pytest.mark.skipif(
    not _ops.CUDA_COMPILED, reason="hyperlr_ext._C was built without its CUDA kernels"
)


def dot_op(a, b):
    return torch.ops.hyperlr_ext.multi_tensor_dot(a, b)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- sample inputs -------------------------------------------------------------------------------


def make_samples(device="cpu", dtype=torch.float32, seed=0, requires_grad=False):
    """(name, a, b) triples covering the cases the op promises to handle."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    samples = [
        (
            "mixed_shapes",
            [rnd(3, 4), rnd(7), rnd(2, 3, 5), rnd()],
            [rnd(12), rnd(7, 1), rnd(30), rnd()],
        ),
        ("multi_chunk", [rnd(2 * CHUNK_SIZE + 17), rnd(5)], [rnd(2 * CHUNK_SIZE + 17), rnd(5)]),
        ("empty_list", [], []),
        ("zero_size", [rnd(0), rnd(3), rnd(2, 0)], [rnd(0), rnd(3), rnd(0, 5)]),
        ("all_zero_size", [rnd(0)], [rnd(0, 3)]),
    ]
    samples.append(
        (
            "non_contiguous",
            [rnd(6, 8).t(), rnd(40)[::3], rnd(1).expand(5)],
            [rnd(48), rnd(2, 8)[:, 1:], rnd(5, 2)[:, 1]],
        )
    )
    return samples


def sample_params(dtypes=DTYPES):
    return [
        pytest.param(dtype, name, id=f"{dtype_id(dtype)}-{name}")
        for dtype in dtypes
        for name, _, _ in make_samples()
    ]


def expected_result_dtype(a) -> torch.dtype:
    """float64 for float64 inputs, else float32 (also for empty lists)."""
    return torch.float64 if a and a[0].dtype == torch.float64 else torch.float32


def get_sample(name, **kwargs):
    return next((a, b) for n, a, b in make_samples(**kwargs) if n == name)


# ---- references ----------------------------------------------------------------------------------


def fp64_reference(a, b) -> float:
    return sum(
        (
            torch.dot(
                x.detach().double().cpu().reshape(-1), y.detach().double().cpu().reshape(-1)
            ).item()
            for x, y in zip(a, b)
        ),
        0.0,
    )


def assert_close_to_fp64(result: torch.Tensor, a, b) -> None:
    """|ours - fp64| <= 2 * max(PyTorch's own error at our accumulation precision, one ulp of
    sum_i |a_i b_i|): the rule of docs/design.md, Conventions, with a floor for the final rounding
    no method avoids."""
    acc_dtype = result.dtype
    reference = fp64_reference(a, b)
    torch_same_precision = sum(
        (
            torch.dot(
                x.detach().cpu().to(acc_dtype).reshape(-1),
                y.detach().cpu().to(acc_dtype).reshape(-1),
            )
            for x, y in zip(a, b)
        ),
        torch.zeros((), dtype=acc_dtype),
    ).item()
    magnitude = sum(
        (
            torch.dot(
                x.detach().double().cpu().abs().reshape(-1),
                y.detach().double().cpu().abs().reshape(-1),
            ).item()
            for x, y in zip(a, b)
        ),
        0.0,
    )
    eps = torch.finfo(acc_dtype).eps
    bound = 2 * max(abs(torch_same_precision - reference), eps * magnitude)
    error = abs(result.item() - reference)
    assert error <= bound, f"error {error:.3e} > bound {bound:.3e} (reference {reference!r})"


def lane_tree_oracle(a, b) -> torch.Tensor:
    """The reduction order documented in csrc/hd_math.h, in numpy: chunks of CHUNK_SIZE, lane
    l sums elements i % LANES == l in order, a halving tree over the lanes, then the same over the
    chunk results. Single mul and add roundings (no FMA)."""
    acc = np.float64 if a and a[0].dtype == torch.float64 else np.float32
    if not a:
        return torch.zeros((), dtype=torch.float32)

    def lane_sums_then_tree(rows):
        lanes = np.zeros(LANES, dtype=acc)
        for row in rows:  # row: up to LANES values, in lane order
            lanes[: len(row)] = lanes[: len(row)] + row
        stride = LANES // 2
        while stride > 0:
            lanes[:stride] = lanes[:stride] + lanes[stride : 2 * stride]
            stride //= 2
        return lanes[0]

    chunk_results = []
    for x, y in zip(a, b):
        xs = x.detach().cpu().reshape(-1).to(torch.float64 if acc is np.float64 else torch.float32)
        ys = y.detach().cpu().reshape(-1).to(xs.dtype)
        xs, ys = xs.numpy(), ys.numpy()
        for start in range(0, xs.size, CHUNK_SIZE):
            products = xs[start : start + CHUNK_SIZE] * ys[start : start + CHUNK_SIZE]
            rows = [products[i : i + LANES] for i in range(0, products.size, LANES)]
            chunk_results.append(lane_sums_then_tree(rows))
    chunk_results = np.array(chunk_results, dtype=acc)
    rows = [chunk_results[i : i + LANES] for i in range(0, chunk_results.size, LANES)]
    return torch.tensor(lane_sums_then_tree(rows))


# ---- the extension itself ------------------------------------------------------------------------


def test_extension_loaded():
    """Fails when HYPERLR_REQUIRE_EXTENSION=1 and the compiled extension did not load."""
    if os.environ.get("HYPERLR_REQUIRE_EXTENSION") == "1":
        assert _ops.EXTENSION_AVAILABLE, (
            f"HYPERLR_REQUIRE_EXTENSION=1 but hyperlr_ext._C is unavailable: {_ops.EXTENSION_ERROR}"
        )
    elif not _ops.EXTENSION_AVAILABLE:
        pytest.skip(f"compiled extension unavailable: {_ops.EXTENSION_ERROR}")
    assert _ops.EXTENSION_ERROR is None
    assert isinstance(_ops.CUDA_COMPILED, bool)
    assert _ops.BUILT_WITH_TORCH == torch.__version__


@needs_extension
def test_cuda_compiled_matches_module():
    from hyperlr_ext import _C

    assert _ops.CUDA_COMPILED is _C.cuda_compiled()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "hyperlr_ext::multi_tensor_dot", "CUDA"
    )
    assert has_cuda_kernel is _ops.CUDA_COMPILED


def test_require_extension():
    if _ops.EXTENSION_AVAILABLE:
        _ops.require_extension("test")
        if not _ops.CUDA_COMPILED:
            with pytest.raises(RuntimeError, match="built CPU-only"):
                _ops.require_extension("test", cuda=True)
    else:
        with pytest.raises(RuntimeError, match="test needs the compiled extension hyperlr_ext._C"):
            _ops.require_extension("test")


def test_package_imports_without_extension():
    """With hyperlr_ext._C unimportable, the package imports and the fallback runs."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "hyperlr_ext._C":
                    raise ModuleNotFoundError("blocked", name=name)
        sys.meta_path.insert(0, Block())
        import torch, hyperlr_ext
        from hyperlr_ext import _ops
        assert not _ops.EXTENSION_AVAILABLE and not _ops.CUDA_COMPILED
        assert "not built" in _ops.EXTENSION_ERROR, _ops.EXTENSION_ERROR
        out = _ops.multi_tensor_dot([torch.ones(3)], [torch.full((3,), 2.0)])
        assert out.item() == 6.0 and out.dtype == torch.float32
        try:
            _ops.require_extension("SGDHD(fused=True)")
        except RuntimeError as exc:
            assert "SGDHD(fused=True) needs the compiled extension" in str(exc)
            assert "pip install --no-build-isolation ." in str(exc)
        else:
            raise AssertionError("require_extension did not raise")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- multi_tensor_dot on the CPU -----------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("dtype,name", sample_params())
def test_opcheck_cpu(dtype, name):
    a, b = get_sample(name, dtype=dtype)
    opcheck(torch.ops.hyperlr_ext.multi_tensor_dot.default, (a, b))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["mixed_shapes", "zero_size", "non_contiguous"])
def test_opcheck_cpu_requires_grad(dtype, name):
    a, b = get_sample(name, dtype=dtype, requires_grad=True)
    opcheck(torch.ops.hyperlr_ext.multi_tensor_dot.default, (a, b))


@needs_extension
@pytest.mark.parametrize("dtype,name", sample_params())
def test_matches_fp64_reference_cpu(dtype, name):
    a, b = get_sample(name, dtype=dtype)
    result = dot_op(a, b)
    assert result.shape == ()
    assert result.dtype == expected_result_dtype(a)
    assert result.device.type == "cpu"
    assert_close_to_fp64(result, a, b)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_reduction_order_matches_documented_layout(dtype):
    """Bit-exact against the numpy oracle of csrc/hd_math.h's order (the CUDA kernel's order)."""
    gen = torch.Generator().manual_seed(1)
    sizes = [3 * CHUNK_SIZE + 1000, 0, 5, LANES + 3, CHUNK_SIZE]
    a = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    b = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    result = dot_op(a, b)
    expected = lane_tree_oracle(a, b)
    assert result.dtype == expected.dtype
    assert torch.equal(result, expected), (result.item(), expected.item())


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_deterministic_across_calls_and_threads(dtype):
    gen = torch.Generator().manual_seed(2)
    sizes = [700_000, 12_345, 1, 3 * CHUNK_SIZE]  # 17 chunks: both threads get work
    a = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    b = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = dot_op(a, b)
        torch.set_num_threads(2)
        two_threads = dot_op(a, b)
        again = dot_op(a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, two_threads)
    assert torch.equal(two_threads, again)


@needs_extension
def test_public_wrapper_uses_compiled_op():
    a, b = get_sample("mixed_shapes")
    assert torch.equal(_ops.multi_tensor_dot(tuple(a), tuple(b)), dot_op(a, b))


@pytest.mark.parametrize("dtype,name", sample_params())
def test_fallback_matches_fp64_reference(dtype, name):
    a, b = get_sample(name, dtype=dtype)
    result = _ops._multi_tensor_dot_fallback(a, b)
    assert result.dtype == expected_result_dtype(a)
    assert_close_to_fp64(result, a, b)


def test_empty_list_result():
    for fn in [_ops._multi_tensor_dot_fallback] + ([dot_op] if _ops.EXTENSION_AVAILABLE else []):
        out = fn([], [])
        assert out.shape == () and out.dtype == torch.float32 and out.item() == 0.0


BAD_ARGS = [
    (
        lambda: ([torch.ones(3)], []),
        "multi_tensor_dot: a and b must have the same length, but a has 1 tensors and b has 0",
    ),
    (
        lambda: ([torch.ones(3), torch.ones(2)], [torch.ones(3), torch.ones(4)]),
        "multi_tensor_dot: a[1] and b[1] must have the same number of elements, "
        "but a[1] has 2 and b[1] has 4",
    ),
    (lambda: ([torch.ones(3)], [torch.arange(3)]), "multi_tensor_dot: b[0] has dtype"),
    (
        lambda: ([torch.ones(3, dtype=torch.complex64)], [torch.ones(3, dtype=torch.complex64)]),
        "multi_tensor_dot: a[0] has dtype",
    ),
    (
        lambda: (
            [torch.ones(3), torch.ones(2)],
            [torch.ones(3), torch.ones(2, dtype=torch.float64)],
        ),
        "multi_tensor_dot: all tensors must have one dtype, but a[0] is",
    ),
    (
        lambda: ([torch.ones(3).to_sparse()], [torch.ones(3)]),
        "multi_tensor_dot: a[0] must be a dense (strided) tensor",
    ),
]


@pytest.mark.parametrize("make_args,message", BAD_ARGS)
def test_errors_name_the_argument(make_args, message):
    fns = [_ops._multi_tensor_dot_fallback] + ([dot_op] if _ops.EXTENSION_AVAILABLE else [])
    for fn in fns:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            fn(*make_args())


@needs_extension
def test_mixed_devices_rejected():
    with pytest.raises(RuntimeError, match="must be on one device"):
        dot_op([torch.ones(3)], [torch.ones(3, device="meta")])


@needs_extension
def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    a = [torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)]
    b = [torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)]
    a.append(torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True))
    b.append(torch.randn(2, 2, generator=gen, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda *t: dot_op(list(t[:2]), list(t[2:])), (*a, *b))


@needs_extension
def test_torch_compile_fullgraph():
    def hypergrad(grads, directions):
        return _ops.multi_tensor_dot(grads, directions) * 2.0

    compiled = torch.compile(hypergrad, backend="aot_eager", fullgraph=True)
    a, b = get_sample("mixed_shapes")
    assert torch.equal(compiled(a, b), hypergrad(a, b))


# ---- multi_tensor_dot on CUDA --------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_extension
def test_cuda_kernel_compiled():
    assert _ops.CUDA_COMPILED, "CUDA device present but hyperlr_ext._C was built CPU-only"


@pytest.mark.gpu
@needs_cuda
@needs_extension
@needs_cuda_kernels
@pytest.mark.parametrize("dtype,name", sample_params())
def test_opcheck_cuda(dtype, name):
    a, b = get_sample(name, device="cuda", dtype=dtype)
    opcheck(torch.ops.hyperlr_ext.multi_tensor_dot.default, (a, b))


@pytest.mark.gpu
@needs_cuda
@needs_extension
@needs_cuda_kernels
@pytest.mark.parametrize("dtype,name", sample_params())
def test_cuda_matches_fp64_and_cpu_bitwise(dtype, name):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh data every run
    a, b = get_sample(name, device="cuda", dtype=dtype, seed=seed)
    result = dot_op(a, b)
    assert result.shape == () and result.dtype == expected_result_dtype(a)
    assert result.device == (a[0].device if a else torch.device("cpu"))
    assert_close_to_fp64(result, a, b)
    # Same math, same order: the CPU kernel gives the same bits (csrc/hd_math.h).
    cpu_result = dot_op([x.cpu() for x in a], [y.cpu() for y in b])
    assert torch.equal(result.cpu(), cpu_result), (seed, result.item(), cpu_result.item())
    assert torch.equal(dot_op(a, b), result)


@pytest.mark.gpu
@needs_cuda
@needs_extension
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cuda_many_launches(dtype):
    """More tensors and chunks than one launch holds, a tensor split across launches."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    sizes = [int(n) for n in torch.randint(0, 3000, (150,), generator=gen)]
    sizes[40] = 330 * CHUNK_SIZE + 123  # > 320 blocks in one tensor
    a = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    b = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    cpu_result = dot_op(a, b)
    result = dot_op([x.cuda() for x in a], [y.cuda() for y in b])
    assert torch.equal(result.cpu(), cpu_result)
    assert_close_to_fp64(cpu_result, a, b)


@pytest.mark.gpu
@needs_cuda
@needs_extension
@needs_cuda_kernels
def test_cuda_graph_capture():
    """No host synchronisation: the op can be captured and replayed in a CUDA graph."""
    a = [torch.randn(100_000, device="cuda"), torch.randn(7, device="cuda")]
    b = [torch.randn(100_000, device="cuda"), torch.randn(7, device="cuda")]
    expected = dot_op(a, b)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dot_op(a, b)  # warm-up outside the capture
        with torch.cuda.graph(graph):
            captured = dot_op(a, b)
    torch.cuda.current_stream().wait_stream(stream)
    a[0].mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, dot_op(a, b))
    assert not torch.equal(captured, expected)
