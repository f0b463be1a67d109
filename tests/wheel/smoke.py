"""Smoke test of an installed hyperlr_ext wheel (run by `make wheel-test` / CI from outside the
source tree, in a fresh virtual environment): the compiled module loads with the kernels the wheel
promises, records the torch it was built against, and every public class takes real steps."""

from __future__ import annotations

import sys

import torch

import hyperlr_ext as hx
from hyperlr_ext import _ops

expect_cuda = "--expect-cuda" in sys.argv
assert "site-packages" in hx.__file__, f"imported the source tree, not the wheel: {hx.__file__}"
assert _ops.EXTENSION_AVAILABLE, _ops.EXTENSION_ERROR
assert _ops.BUILT_WITH_TORCH.split("+")[0] == torch.__version__.split("+")[0]
assert _ops.CUDA_COMPILED or not expect_cuda, "the wheel has no CUDA kernels"
assert hx.MLRSNet.pretrained_names(), "the pretrained MLR-SNet nets are missing from the wheel"

torch.manual_seed(0)
x, y = torch.randn(64, 5), torch.randn(64, 1)
for make in (
    lambda p: hx.SGDHD(p, lr=0.05, hyper_lr=1e-3, momentum=0.9),
    lambda p: hx.AdamHD(p, lr=1e-2, hyper_lr=1e-6),
    lambda p: hx.MARTHE(p, lr=0.05, hyper_lr=1e-4, momentum=0.9),
    lambda p: hx.RTHO(p, lr=0.05, hyper_lr=1e-4, inner="adam"),
):
    model = torch.nn.Linear(5, 1)
    opt = make(model.parameters())
    first = float(torch.nn.functional.mse_loss(model(x), y))
    for _ in range(30):
        if isinstance(opt, hx.MARTHE):
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        else:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert float(torch.nn.functional.mse_loss(model(x), y)) < first, type(opt).__name__
model = torch.nn.Linear(5, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for sched in (hx.TLR(opt, update_every=3), hx.MLRSNet.from_pretrained(opt, "mnist-mlp")):
    for _ in range(6):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step(loss) if isinstance(sched, hx.MLRSNet) else sched.step()
print(
    f"wheel OK: hyperlr_ext {hx.__version__}, built with torch {_ops.BUILT_WITH_TORCH}, "
    f"CUDA kernels {'yes' if _ops.CUDA_COMPILED else 'no'}"
)
