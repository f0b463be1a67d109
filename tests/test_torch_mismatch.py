"""A compiled module built against another torch release is not used: the import says so once
(a RuntimeWarning) and every optimizer runs its pure-PyTorch path, with the same results."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hyperlr_ext import _ops


def test_release_comparison():
    assert _ops.torch_mismatch(None, "2.14.1") is None
    assert _ops.torch_mismatch("2.14.1+cu130", "2.14.1+cpu") is None
    message = _ops.torch_mismatch("2.14.1+cu130", "2.15.0")
    assert "2.14.1+cu130" in message and "2.15.0" in message and "ABI" in message


@pytest.mark.skipif(not _ops.EXTENSION_AVAILABLE, reason="needs the compiled extension")
def test_mismatched_torch_falls_back_with_one_warning(tmp_path):
    code = textwrap.dedent(
        """
        import warnings
        import torch
        warnings.simplefilter("always")
        built = None
        with warnings.catch_warnings(record=True) as caught:
            torch.__version__ = "1.0.0"  # pretend another torch release is installed
            import hyperlr_ext as hx
            from hyperlr_ext import _ops
            model = torch.nn.Linear(3, 1)
            opt = hx.SGDHD(model.parameters(), lr=0.1, hyper_lr=1e-3)
            for _ in range(3):
                opt.zero_grad()
                model(torch.ones(2, 3)).sum().backward()
                opt.step()
        mine = [w for w in caught if "hyperlr_ext._C was compiled" in str(w.message)]
        assert len(mine) == 1, [str(w.message) for w in caught]
        assert "falls back to its pure-PyTorch" in str(mine[0].message)
        assert not _ops.EXTENSION_AVAILABLE and "1.0.0" in _ops.EXTENSION_ERROR
        try:
            hx.SGDHD(torch.nn.Linear(2, 1).parameters(), fused=True)
        except RuntimeError as error:
            assert "not used" in str(error)
        else:
            raise AssertionError("fused=True must be refused without the compiled module")
        print("fallback OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "fallback OK" in result.stdout
