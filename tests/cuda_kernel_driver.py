"""Runs every CUDA kernel of hyperlr_ext on a GPU, once per sample of kernel_samples.py (every op,
mode and AMP flag, at the op tests' shapes, in four dtypes), and checks each against the CPU kernel
(bit for bit, or within the bias-correction tolerance of Adam's pow, which differs between the
CUDA and CPU math libraries). Written for compute-sanitizer (make gpu-check):

    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/cuda_kernel_driver.py
"""

from __future__ import annotations

import copy
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import torch  # noqa: E402
from kernel_samples import FAMILIES  # noqa: E402

from hyperlr_ext import _ops  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
POW_FAMILIES = ("adam_hd", "tangent")  # bias corrections: CUDA's pow vs the C library's


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def main() -> int:
    if not (torch.cuda.is_available() and _ops.CUDA_COMPILED):
        print("cuda_kernel_driver: needs a GPU and hyperlr_ext._C with its CUDA kernels")
        return 2
    failures, calls = [], 0
    for family, make in FAMILIES.items():
        for dtype in DTYPES:
            for index, (op, args) in enumerate(make("cuda", dtype)):
                cpu_args = _to_cpu(args)
                gpu_args = copy.deepcopy(args)
                gpu_result = op(*gpu_args)
                cpu_result = op(*cpu_args)
                torch.cuda.synchronize()
                calls += 1
                got = list(_tensors((gpu_result, gpu_args)))
                want = list(_tensors((cpu_result, cpu_args)))
                for a, b in zip(got, want):
                    a = a.cpu()
                    same = (
                        torch.equal(a, b)
                        or (a.isnan() == b.isnan()).all()
                        and torch.equal(a.nan_to_num(), b.nan_to_num())
                    )
                    if not same and family in POW_FAMILIES:
                        eps = torch.finfo(b.dtype).eps
                        same = torch.allclose(a.double(), b.double(), rtol=64 * eps, atol=0)
                    if not same:
                        failures.append(f"{family} {dtype} sample {index} ({op})")
                        break
    print(f"cuda_kernel_driver: {calls} calls, {len(failures)} differ from the CPU kernels")
    for failure in failures:
        print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
