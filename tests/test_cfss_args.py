"""cfss_iterate argument bounds that hold on every backend."""
import pytest
import torch

import geokernels
from geokernels.ops.cfss import MAX_HALFSIZE
from tests._util import backend_device_params


def _inputs(device="cpu"):
    o = torch.randn(1, 1, 6, 7, dtype=torch.float64, device=device)
    T = torch.randn(1, 2, 6, 7, dtype=torch.float64, device=device)
    return o, T


# 2**32 + 1 ran as 1 and 2**31 as INT_MIN in the C++ kernels (an int narrowing)
@pytest.mark.parametrize("halfsize", [MAX_HALFSIZE + 1, 2**29, 2**31, 2**32 + 1, 2**63 - 1])
@pytest.mark.parametrize("backend", ["auto", "cpu", "cuda", "triton", "torch"])
def test_halfsize_upper_bound(halfsize, backend):
    o, T = _inputs()
    # checked before the backend is chosen: the same error whichever backend, available or not
    with pytest.raises(ValueError, match=rf"halfsize must be <= {MAX_HALFSIZE}, got {halfsize}"):
        geokernels.cfss_iterate(o, T, iters=2, halfsize=halfsize, backend=backend)


def test_halfsize_upper_bound_is_1024():
    assert MAX_HALFSIZE == 1024


@pytest.mark.parametrize("device,backend", [p for p in backend_device_params("cfss_iterate")
                                            if p.values[1] != "triton"])
def test_wide_halfsize_still_allowed(device, backend):
    # a window far wider than the image is legitimate (taps outside see zeros)
    o, T = _inputs(device)
    hs = 50 if backend == "cpu" else 16  # CUDA's own limit is 16
    z = geokernels.cfss_iterate(o, T, iters=2, halfsize=hs, backend=backend)
    ref = geokernels.cfss_iterate(o.cpu(), T.cpu(), iters=2, halfsize=hs, backend="torch")
    torch.testing.assert_close(z.cpu(), ref, rtol=1e-10, atol=1e-10)


def test_halfsize_at_the_bound_runs():
    o, T = _inputs()
    z = geokernels.cfss_iterate(o, T, iters=1, halfsize=MAX_HALFSIZE, backend="cpu")
    ref = geokernels.cfss_iterate(o, T, iters=1, halfsize=MAX_HALFSIZE, backend="torch")
    torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-10)
