"""contour_flow_field (SPEC.md 2.2): every backend vs the reference (exact), the reference vs an
independent numpy/scipy transcription, hand-computed cases, ablations, bad input."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import geokernels
from geokernels import reference
from tests._util import backend_device_params, requires_cuda
from tests.test_distance import random_mask

# this op has C++ and CUDA kernels only (no Triton): one param per device
OPS_PARAMS = [p for p in backend_device_params("contour_flow_field") if "triton" not in p.id]


def numpy_field(mask, stencil="forward", dtype=np.float64, sigma=0.0):
    """SPEC 2.2 on every plane with scipy's EDT and numpy differences (external oracle)."""
    m = mask.detach().cpu().numpy() != 0
    B, C, H, W = m.shape
    out = np.zeros((B, 2 * C, H, W), dtype=dtype)
    for b in range(B):
        for c in range(C):
            mm = m[b, c]
            if mm.all() or not mm.any():
                continue  # no contour: zero field (scipy's EDT is not defined there)
            d_in = ndi.distance_transform_edt(mm).astype(dtype)
            d_out = ndi.distance_transform_edt(~mm).astype(dtype)
            g0 = np.zeros((H, W), dtype)
            g1 = np.zeros((H, W), dtype)
            if H >= 3 and W >= 3:
                if sigma > 0:
                    sd = ndi.gaussian_filter((d_in - d_out).astype(np.float64), sigma, mode="nearest",
                                             truncate=4.0).astype(dtype)
                    a = b_ = sd
                    sel = np.ones((H - 2, W - 2), bool)
                else:
                    a, b_ = d_in, -d_out
                    sel = mm[1:-1, 1:-1]
                if stencil == "forward":
                    da0, da1 = a[2:, 1:-1] - a[1:-1, 1:-1], a[1:-1, 2:] - a[1:-1, 1:-1]
                    db0, db1 = b_[2:, 1:-1] - b_[1:-1, 1:-1], b_[1:-1, 2:] - b_[1:-1, 1:-1]
                else:
                    da0, da1 = (a[2:, 1:-1] - a[:-2, 1:-1]) / 2, (a[1:-1, 2:] - a[1:-1, :-2]) / 2
                    db0, db1 = (b_[2:, 1:-1] - b_[:-2, 1:-1]) / 2, (b_[1:-1, 2:] - b_[1:-1, :-2]) / 2
                g0[1:-1, 1:-1] = np.where(sel, da0, db0)
                g1[1:-1, 1:-1] = np.where(sel, da1, db1)
            norm = np.sqrt(g0 * g0 + g1 * g1)
            den = np.maximum(norm, dtype(1e-20))
            out[b, 2 * c] = -(g1 / den)
            out[b, 2 * c + 1] = g0 / den
    return torch.from_numpy(out)


SHAPES = [(1, 1, 1, 1), (1, 1, 2, 9), (1, 1, 3, 3), (2, 3, 17, 23), (1, 2, 40, 33), (2, 1, 64, 47)]
CASES = [dict(density=0.5), dict(density=0.3, blobs=True), dict(density=0.7, blobs=True)]


@pytest.mark.parametrize("device,backend", OPS_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stencil", ["forward", "central"])
def test_matches_reference_exactly(device, backend, dtype, stencil):
    for k, shape in enumerate(SHAPES):
        for j, case in enumerate(CASES):
            mask = random_mask(shape, seed=20 * k + j, **case)
            ref = reference.contour_flow_field(mask, stencil, 0.0, dtype)
            out = geokernels.contour_flow_field(mask.to(device), stencil, dtype=dtype, backend=backend)
            assert out.dtype == dtype and out.shape == (shape[0], 2 * shape[1]) + shape[2:]
            assert torch.isfinite(out).all()
            # same operations in the same dtype: identical up to the sign of zeros
            assert torch.equal(out.cpu(), ref), f"{shape} {case}"


@pytest.mark.parametrize("dtype,np_dtype", [(torch.float32, np.float32), (torch.float64, np.float64)],
                         ids=["f32", "f64"])
@pytest.mark.parametrize("stencil", ["forward", "central"])
def test_reference_matches_scipy_transcription(dtype, np_dtype, stencil):
    for k, shape in enumerate(SHAPES[2:]):
        mask = random_mask(shape, seed=50 + k, density=0.4, blobs=True)
        ref = reference.contour_flow_field(mask, stencil, 0.0, dtype)
        assert torch.equal(ref, numpy_field(mask, stencil, np_dtype))


def test_reference_same_with_bruteforce_edt():
    mask = random_mask((2, 2, 13, 11), density=0.5, seed=8)
    brute = reference.contour_flow_field(
        mask, dtype=torch.float64,
        edt=lambda m, inv, dt: reference.distance_transform_bruteforce(m, inv, dt))
    assert torch.equal(brute, reference.contour_flow_field(mask, dtype=torch.float64))


def test_hand_computed_half_plane():
    # columns 0-1 foreground: d_in = (2, 1), d_out = (1, 2, 3) in columns 2-4. Interior pixels:
    # G = (0, -1) on both sides -> N = (0, -1) -> F = (-N1, N0) = (1, 0); the border stays 0.
    mask = torch.zeros(1, 1, 5, 5)
    mask[..., :2] = 1
    f = geokernels.contour_flow_field(mask, backend="cpu")
    expect = torch.zeros(1, 2, 5, 5)
    expect[0, 0, 1:-1, 1:-1] = 1.0
    assert torch.equal(f, expect)
    # a 5x5 square: on each side G points inward (d_in grows), F = G rotated by +90 degrees
    sq = torch.zeros(1, 1, 9, 9)
    sq[..., 2:7, 2:7] = 1
    f = geokernels.contour_flow_field(sq, backend="cpu")[0]
    assert f[:, 4, 2].tolist() == [-1.0, 0.0]  # left side: G = (0, 1)
    assert f[:, 4, 6].tolist() == [1.0, 0.0]  # right side: G = (0, -1)
    assert f[:, 2, 4].tolist() == [0.0, 1.0]  # top side: G = (1, 0)
    assert f[:, 6, 4].tolist() == [0.0, -1.0]  # bottom side: G = (-1, 0)


@pytest.mark.parametrize("device,backend", OPS_PARAMS)
def test_unit_tangent_properties(device, backend):
    mask = random_mask((2, 2, 48, 41), density=0.5, blobs=True, seed=12)
    f = geokernels.contour_flow_field(mask.to(device), dtype=torch.float64, backend=backend).cpu()
    f = f.view(2, 2, 2, 48, 41)
    norm = f.norm(dim=2)
    interior = norm[..., 1:-1, 1:-1]
    # |F| is 1 wherever G != 0 and exactly 0 elsewhere (G = 0 on the border)
    assert ((interior - 1).abs() < 1e-12).logical_or(interior == 0).all()
    assert (norm[..., 0, :] == 0).all() and (norm[..., :, -1] == 0).all()
    assert (interior > 0).float().mean() > 0.9
    # F is G rotated by +90 degrees: orthogonal to the distance gradient
    d_in = reference.distance_transform(mask, dtype=torch.float64)
    d_out = reference.distance_transform(mask, invert=True, dtype=torch.float64)
    g0, g1 = reference.grad_forward(torch.where(mask, d_in, -d_out), "valid")
    dot = f[:, :, 0] * g0 + f[:, :, 1] * g1
    sel = mask[..., 1:-1, 1:-1] == mask[..., 2:, 1:-1]  # stencil inside one region
    sel &= mask[..., 1:-1, 1:-1] == mask[..., 1:-1, 2:]
    assert dot[..., 1:-1, 1:-1][sel].abs().max() < 1e-12


@pytest.mark.parametrize("device,backend", OPS_PARAMS + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_constant_and_tiny_planes_are_zero(device, backend):
    mask = torch.zeros(3, 2, 6, 7, device=device)
    mask[0, 0] = 1  # all foreground
    mask[1, 1, 2:4, 2:5] = 1  # a real shape next to an all-background plane
    f = geokernels.contour_flow_field(mask, backend=backend).cpu()
    assert torch.isfinite(f).all()
    assert (f[0, 0:2] == 0).all() and (f[0, 2:4] == 0).all() and (f[1, 0:2] == 0).all()
    assert (f[1, 2:4].abs().sum() > 0)
    for shape in [(1, 1, 2, 9), (1, 1, 9, 2), (1, 1, 1, 1)]:
        m = random_mask(shape, seed=1).to(device)
        assert (geokernels.contour_flow_field(m, backend=backend) == 0).all()


@pytest.mark.parametrize("device,backend", OPS_PARAMS)
def test_channel_layout_and_batches(device, backend):
    mask = random_mask((3, 2, 21, 19), density=0.5, blobs=True, seed=13).to(device)
    f = geokernels.contour_flow_field(mask, backend=backend)
    for b in range(3):
        for c in range(2):
            single = geokernels.contour_flow_field(mask[b:b + 1, c:c + 1], backend=backend)
            assert torch.equal(f[b:b + 1, 2 * c:2 * c + 2], single)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32, torch.float64])
def test_binary_mask_dtypes(mask_dtype):
    mask = random_mask((1, 1, 15, 17), density=0.5, blobs=True, seed=14)
    expect = geokernels.contour_flow_field(mask, backend="cpu")
    assert torch.equal(geokernels.contour_flow_field(mask.to(mask_dtype), backend="cpu"), expect)
    noncontig = mask.to(mask_dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(geokernels.contour_flow_field(noncontig, backend="cpu"), expect)


def test_threshold_binarises_soft_masks():
    prob = torch.rand(2, 1, 16, 18, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="binary"):
        geokernels.contour_flow_field(prob, backend="cpu")
    out = geokernels.contour_flow_field(prob, threshold=0.5, backend="cpu")
    assert torch.equal(out, geokernels.contour_flow_field(prob > 0.5, backend="cpu"))


@pytest.mark.parametrize("device,backend", OPS_PARAMS + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("stencil", ["forward", "central"])
def test_smoothed_ablation(device, backend, stencil):
    mask = random_mask((2, 1, 33, 30), density=0.4, blobs=True, seed=15)
    out = geokernels.contour_flow_field(mask.to(device), stencil, smooth_sigma=1.5, dtype=torch.float64,
                                        backend=backend).cpu()
    expect = numpy_field(mask, stencil, np.float64, sigma=1.5)
    torch.testing.assert_close(out, expect, rtol=1e-9, atol=1e-9)
    # smoothing changes the field (it is not silently ignored)
    plain = geokernels.contour_flow_field(mask.to(device), stencil, dtype=torch.float64, backend=backend)
    assert (plain.cpu() - out).abs().max() > 1e-3


def test_opcheck():
    mask = random_mask((2, 3, 9, 10), seed=4)
    for args in [(False, False), (True, True)]:
        torch.library.opcheck(torch.ops.geokernels.contour_flow_field.default, (mask,) + args)
    torch.library.opcheck(torch.ops.geokernels.contour_flow_field.default, (mask.double(), False, False))


def test_torch_compile_fullgraph():
    mask = random_mask((2, 1, 19, 17), seed=6, blobs=True)
    f = torch.compile(lambda m: geokernels.contour_flow_field(m, backend="cpu") + 1, fullgraph=True,
                      backend="aot_eager")
    assert torch.equal(f(mask), geokernels.contour_flow_field(mask, backend="cpu") + 1)


@requires_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu_large():
    mask = random_mask((4, 2, 257, 301), density=0.5, blobs=True, seed=16)
    mask[0, 0] = True
    for stencil in ("forward", "central"):
        for dtype in (torch.float32, torch.float64):
            a = geokernels.contour_flow_field(mask, stencil, dtype=dtype, backend="cpu")
            b = geokernels.contour_flow_field(mask.cuda(), stencil, dtype=dtype, backend="cuda")
            assert torch.equal(a, b.cpu())


# ---- bad input --------------------------------------------------------------------------------
BAD = [
    (lambda: torch.ones(3, 4, 5), {}, ValueError, "mask"),
    (lambda: torch.ones(1, 1, 0, 4), {}, ValueError, "mask"),
    (lambda: torch.full((1, 1, 3, 3), float("nan")), {}, ValueError, "mask"),
    (lambda: torch.full((1, 1, 3, 3), 0.5), {}, ValueError, "binary"),
    (lambda: torch.full((1, 1, 3, 3), 2), {}, ValueError, "binary"),
    (lambda: "mask", {}, TypeError, "mask"),
    (lambda: torch.ones(1, 1, 3, 3), {"stencil": "sobel"}, ValueError, "stencil"),
    (lambda: torch.ones(1, 1, 3, 3), {"smooth_sigma": -1.0}, ValueError, "smooth_sigma"),
    (lambda: torch.ones(1, 1, 3, 3), {"smooth_sigma": float("nan")}, ValueError, "smooth_sigma"),
    (lambda: torch.ones(1, 1, 3, 3), {"threshold": "half"}, TypeError, "threshold"),
    (lambda: torch.ones(1, 1, 3, 3), {"dtype": torch.int32}, TypeError, "dtype"),
    (lambda: torch.ones(1, 1, 3, 3), {"backend": "gpu"}, ValueError, "backend"),
]


@pytest.mark.parametrize("make,kwargs,exc,name", BAD, ids=[f"{b[2].__name__}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(make, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        geokernels.contour_flow_field(make(), **kwargs)


def test_raw_op_rejects_bad_input():
    with pytest.raises(ValueError, match="mask must have shape"):
        torch.ops.geokernels.contour_flow_field(torch.ones(4, 4), False, False)
    with pytest.raises(ValueError, match="mask must not be empty"):
        torch.ops.geokernels.contour_flow_field(torch.ones(0, 1, 3, 3), False, False)
