"""distance_transform (SPEC.md 2.1-2.2): exact vs scipy.ndimage.distance_transform_edt and vs the
brute-force definition, every backend, edge cases, bad input."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import geokernels
from geokernels import reference
from tests._util import backend_device_params, requires_cuda

# this op has C++ and CUDA kernels only (no Triton): one param per device
OPS_PARAMS = [p for p in backend_device_params("distance_transform") if "triton" not in p.id]


def random_mask(shape, density=0.5, seed=0, blobs=False, dtype=torch.bool):
    """Random foreground masks: i.i.d. pixels, or smooth blobs (large distances)."""
    g = torch.Generator().manual_seed(seed)
    if blobs:
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        noise = torch.from_numpy(ndi.gaussian_filter(noise.numpy(), sigma=(0, 0, 3, 3)))
        m = noise > noise.flatten().quantile(1 - density)
    else:
        m = torch.rand(shape, generator=g) < density
    return m.to(dtype)


def scipy_edt(mask, invert=False, dtype=np.float64):
    """scipy on every (b, c) plane (scipy on a 4-D array would be a 4-D transform)."""
    m = mask.detach().cpu().numpy() != 0
    if invert:
        m = ~m
    out = np.empty(m.shape, dtype=np.float64)
    for b in range(m.shape[0]):
        for c in range(m.shape[1]):
            out[b, c] = ndi.distance_transform_edt(m[b, c])
    return torch.from_numpy(out.astype(dtype))


SHAPES = [(1, 1, 1, 1), (1, 1, 1, 9), (1, 1, 8, 1), (2, 3, 17, 23), (1, 2, 40, 33), (3, 1, 5, 64)]
CASES = [dict(density=0.5), dict(density=0.97), dict(density=0.2), dict(density=0.9, blobs=True)]


@pytest.mark.parametrize("device,backend", OPS_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("invert", [False, True], ids=["to-zero", "to-nonzero"])
def test_equals_scipy(device, backend, dtype, invert):
    for k, shape in enumerate(SHAPES):
        for j, case in enumerate(CASES):
            mask = random_mask(shape, seed=10 * k + j, **case).to(device)
            out = geokernels.distance_transform(mask, invert=invert, dtype=dtype, backend=backend)
            assert out.dtype == dtype and out.shape == mask.shape and out.device == mask.device
            expect = scipy_edt(mask, invert=invert).to(dtype)
            if not bool(((mask != 0) != invert).all(-1).all(-1).any()):  # no all-target-free plane
                assert torch.equal(out.cpu(), expect), f"{shape} {case}"
            else:
                ok = torch.isfinite(out.cpu())
                assert torch.equal(out.cpu()[ok], expect[ok]), f"{shape} {case}"


@pytest.mark.parametrize("device,backend", OPS_PARAMS)
def test_large_image_equals_scipy(device, backend):
    # long distances and big blobs (int64 algebra, many parabolas per row)
    mask = random_mask((2, 1, 300, 257), density=0.995, blobs=True, seed=3).to(device)
    mask[0, 0, 150:, :] = True  # a big all-foreground band: distances up to ~150
    out = geokernels.distance_transform(mask, dtype=torch.float64, backend=backend)
    assert torch.equal(out.cpu(), scipy_edt(mask))


def test_single_background_pixel_everywhere():
    # one zero pixel per plane at every position of a small image (exercises every envelope)
    H, W = 6, 7
    mask = torch.ones(H * W, 1, H, W, dtype=torch.uint8)
    for p in range(H * W):
        mask[p, 0, p // W, p % W] = 0
    out = geokernels.distance_transform(mask, dtype=torch.float64, backend="cpu")
    assert torch.equal(out, scipy_edt(mask))


@pytest.mark.parametrize("device,backend", OPS_PARAMS + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_all_foreground_and_all_background(device, backend):
    H, W = 5, 7
    mask = torch.ones(3, 1, H, W, device=device)
    mask[1] = 0
    mask[2, 0, 4, 6] = 0  # a single background pixel at the far corner
    inf = geokernels.distance_transform(mask, backend=backend)
    assert torch.isinf(inf[0]).all() and (inf[0] > 0).all()  # documented: +inf, no zero pixel
    assert (inf[1] == 0).all()
    sp = geokernels.distance_transform(mask, no_background="scipy", dtype=torch.float64, backend=backend)
    assert torch.equal(sp.cpu(), scipy_edt(mask))  # scipy's (-1, 0) virtual background pixel
    assert torch.equal(inf[1:].cpu(), sp[1:].float().cpu())
    # the inverted transform of an all-zero plane has no target either
    inv = geokernels.distance_transform(mask, invert=True, backend=backend)
    assert torch.isinf(inv[1]).all() and (inv[0] == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64,
                                        torch.float32, torch.float64])
def test_mask_dtypes_nonzero_is_foreground(mask_dtype):
    g = torch.Generator().manual_seed(1)
    vals = torch.randint(-2, 3, (2, 2, 19, 21), generator=g)
    if mask_dtype == torch.bool:
        mask = vals != 0
    elif mask_dtype == torch.uint8:
        mask = vals.abs().to(mask_dtype)
    elif mask_dtype.is_floating_point:
        mask = (vals * 0.37).to(mask_dtype)  # fractional and negative values are foreground too
    else:
        mask = vals.to(mask_dtype)
    out = geokernels.distance_transform(mask, dtype=torch.float64, backend="cpu")
    assert torch.equal(out, scipy_edt(mask))
    tiny = torch.full((1, 1, 3, 3), 1e-300, dtype=torch.float64)
    tiny[0, 0, 0, 0] = 0
    assert geokernels.distance_transform(tiny, backend="cpu")[0, 0, 2, 2] == pytest.approx(8 ** 0.5)


def test_reference_bruteforce_equals_separable_and_scipy():
    for k, shape in enumerate([(1, 1, 1, 1), (2, 2, 9, 13), (1, 1, 16, 5), (1, 1, 1, 11)]):
        for j, case in enumerate(CASES):
            mask = random_mask(shape, seed=100 + 10 * k + j, **case)
            for invert in (False, True):
                for nb in ("inf", "scipy"):
                    brute = reference.distance_transform_bruteforce(mask, invert, torch.float64, nb)
                    sep = reference.distance_transform(mask, invert, torch.float64, nb)
                    assert torch.equal(brute, sep)
                    if nb == "scipy":
                        assert torch.equal(brute, scipy_edt(mask, invert=invert))


@pytest.mark.parametrize("device,backend", OPS_PARAMS)
def test_matches_bruteforce_reference(device, backend):
    mask = random_mask((3, 2, 11, 14), density=0.8, seed=7)
    mask[0, 1] = True  # an all-foreground plane
    mask[2, 0] = False  # an all-background plane
    for invert in (False, True):
        for dtype in (torch.float32, torch.float64):
            out = geokernels.distance_transform(mask.to(device), invert=invert, dtype=dtype, backend=backend)
            ref = reference.distance_transform_bruteforce(mask, invert, dtype)
            assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("device,backend", OPS_PARAMS)
def test_noncontiguous_and_planes_independent(device, backend):
    base = random_mask((2, 3, 21, 18), density=0.7, seed=5, dtype=torch.float32).to(device)
    mask = base.transpose(-1, -2)
    assert not mask.is_contiguous()
    out = geokernels.distance_transform(mask, backend=backend)
    assert torch.equal(out.cpu(), scipy_edt(mask).float())
    for b in range(2):
        for c in range(3):
            single = geokernels.distance_transform(mask[b:b + 1, c:c + 1], backend=backend)
            assert torch.equal(out[b:b + 1, c:c + 1], single)


# ---- mask dtypes the kernels have no case for (uint16/32/64, float8): converted exactly -------
FIELD_PARAMS = [p for p in backend_device_params("contour_flow_field") if "triton" not in p.id]
REF_PARAM = [pytest.param("cpu", "torch", id="cpu-torch")]
# nonzero values per dtype that a lossy conversion would turn into 0 (256 -> uint8, 2**16 ->
# (u)int16, 2**32 -> (u)int32, 2**-9 -> any int) or into a negative number (2**63 -> int64);
# float8 values are exact in float32
WIDE_VALUES = {
    torch.uint16: [1, 256, 2**15, 65535],
    torch.uint32: [1, 256, 2**16, 2**31, 2**32 - 1],
    torch.uint64: [1, 2**16, 2**32, 2**63, 2**64 - 1],
    torch.float8_e4m3fn: [1.0, 2.0**-9, -0.25, 448.0],
    torch.float8_e5m2: [1.0, 2.0**-16, -0.25, 57344.0],
}
WIDE_DTYPES = list(WIDE_VALUES)
WIDE_IDS = [str(d).removeprefix("torch.") for d in WIDE_DTYPES]


def wide_mask(dtype, shape=(2, 2, 13, 17), seed=0, binary=False):
    """(mask of ``dtype``, the same foreground as bool): ~60 % foreground; big values unless
    ``binary``."""
    g = torch.Generator().manual_seed(seed)
    fg = torch.rand(shape, generator=g) < 0.6
    fg[0, 0] = True  # an all-foreground plane
    fg[1, 1] = False  # an all-background plane
    values = [1] if binary else WIDE_VALUES[dtype]
    table = torch.tensor([0] + values, dtype=torch.float32 if dtype.is_floating_point else dtype)
    pick = torch.randint(1, len(values) + 1, shape, generator=g) * fg
    mask = table[pick].to(dtype)
    if dtype.is_floating_point:
        assert torch.equal(mask.float(), table[pick])  # the values above are float8-exact
    assert torch.equal(mask != 0, fg)
    return mask, fg


@pytest.mark.parametrize("mask_dtype", WIDE_DTYPES, ids=WIDE_IDS)
@pytest.mark.parametrize("device,backend", OPS_PARAMS + REF_PARAM)
def test_distance_transform_wide_mask_dtypes_equal_bool(device, backend, mask_dtype):
    mask, fg = wide_mask(mask_dtype, seed=1)
    mask, fg = mask.to(device), fg.to(device)
    for invert in (False, True):
        for nb in ("inf", "scipy"):
            kw = dict(invert=invert, no_background=nb, dtype=torch.float64, backend=backend)
            out = geokernels.distance_transform(mask, **kw)
            assert torch.equal(out, geokernels.distance_transform(fg, **kw)), (invert, nb)
    # a non-contiguous mask of the same dtype
    out = geokernels.distance_transform(mask.transpose(-1, -2), backend=backend)
    assert torch.equal(out, geokernels.distance_transform(fg.transpose(-1, -2), backend=backend))


@pytest.mark.parametrize("mask_dtype", WIDE_DTYPES, ids=WIDE_IDS)
@pytest.mark.parametrize("device,backend", FIELD_PARAMS + REF_PARAM)
def test_contour_flow_field_wide_mask_dtypes_equal_bool(device, backend, mask_dtype):
    f = geokernels.contour_flow_field
    mask, fg = wide_mask(mask_dtype, seed=2, binary=True)
    mask, fg = mask.to(device), fg.to(device)
    for stencil in ("forward", "central"):
        for dtype in (torch.float32, torch.float64):
            kw = dict(stencil=stencil, dtype=dtype, backend=backend)
            assert torch.equal(f(mask, **kw), f(fg, **kw)), (stencil, dtype)
    kw = dict(smooth_sigma=1.5, dtype=torch.float64, backend=backend)  # composed from the EDT
    assert torch.equal(f(mask, **kw), f(fg, **kw))
    # soft masks with threshold: big values, negative float8 values
    big, _ = wide_mask(mask_dtype, seed=3)
    big = big.to(device)
    above = (big.float() if mask_dtype.is_floating_point else big) > 0.5
    assert torch.equal(f(big, threshold=0.5, backend=backend), f(above, backend=backend))
    # without threshold a non-binary mask is still rejected (value checks run on CPU tensors)
    if device == "cpu":
        with pytest.raises(ValueError, match="mask must be binary"):
            f(big, backend=backend)


@pytest.mark.parametrize("op", ["distance_transform", "contour_flow_field"])
def test_float8_mask_nan_and_inf_rejected_like_float32(op):
    fn = getattr(geokernels, op)
    for dtype, bad in ((torch.float8_e4m3fn, float("nan")), (torch.float8_e5m2, float("inf")),
                       (torch.float8_e5m2, float("nan"))):
        m = torch.zeros(1, 1, 4, 5)
        m[0, 0, 1, 2] = bad
        m = m.to(dtype)
        assert not bool(torch.isfinite(m.float()).all())
        for backend in ("cpu", "torch"):
            with pytest.raises(ValueError, match="mask contains NaN or Inf"):
                fn(m, backend=backend)


UNREADABLE_DTYPES = [d for d in (getattr(torch, n, None) for n in (
    "float4_e2m1fn_x2", "bits8", "bits16", "uint4", "int4", "uint1")) if d is not None]


@pytest.mark.parametrize("op", ["distance_transform", "contour_flow_field"])
@pytest.mark.parametrize("mask_dtype", UNREADABLE_DTYPES,
                         ids=[str(d).removeprefix("torch.") for d in UNREADABLE_DTYPES])
def test_unreadable_mask_dtypes_raise_type_error(op, mask_dtype):
    mask = torch.empty(1, 1, 3, 4, dtype=mask_dtype)
    for backend in ("cpu", "torch"):
        with pytest.raises(TypeError, match="mask must be a bool, integer or floating-point"):
            getattr(geokernels, op)(mask, backend=backend)


def test_kernel_mask_dtypes_passed_without_copy():
    from geokernels.ops import distance as dist

    for dt in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64):
        m = torch.ones(1, 1, 2, 3, dtype=dt)
        assert dist._kernel_mask(dist._check_mask(m)).data_ptr() == m.data_ptr(), dt
    for dt in (torch.uint16, torch.uint32, torch.uint64):
        m = torch.ones(1, 1, 2, 3, dtype=dt)
        assert dist._kernel_mask(dist._check_mask(m)).dtype == torch.bool


def test_requires_grad_mask_is_detached():
    mask = random_mask((1, 1, 9, 9), seed=2, dtype=torch.float64).requires_grad_()
    out = geokernels.distance_transform(mask, backend="cpu")
    assert not out.requires_grad


def test_deterministic_across_thread_counts():
    mask = random_mask((3, 2, 70, 301), density=0.9, blobs=True, seed=9)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = geokernels.distance_transform(mask, backend="cpu")
        torch.set_num_threads(max(2, n))
        many = geokernels.distance_transform(mask, backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, many)


def test_opcheck():
    mask = random_mask((2, 3, 9, 10), seed=4)
    for args in [(False, False, "inf"), (True, True, "scipy")]:
        torch.library.opcheck(torch.ops.geokernels.distance_transform.default, (mask,) + args)
    torch.library.opcheck(torch.ops.geokernels.distance_transform.default,
                          (mask.float(), False, True, "inf"))


def test_torch_compile_fullgraph():
    mask = random_mask((2, 1, 19, 17), seed=6)
    # aot_eager: graph capture + fake kernel without inductor codegen (slow on 2 cores)
    f = torch.compile(lambda m: geokernels.distance_transform(m, backend="cpu") * 2, fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(mask), geokernels.distance_transform(mask, backend="cpu") * 2,
                               rtol=0, atol=0)


@requires_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu_worst_cases():
    cases = [torch.ones(1, 1, 257, 1000, dtype=torch.bool), torch.zeros(2, 1, 64, 65, dtype=torch.bool),
             random_mask((4, 2, 129, 131), density=0.999, seed=11)]
    cases[0][0, 0, 256, 999] = False  # one far-corner background pixel: distances up to ~1030
    for mask in cases:
        for invert in (False, True):
            for nb in ("inf", "scipy"):
                a = geokernels.distance_transform(mask, invert=invert, no_background=nb, backend="cpu",
                                                  dtype=torch.float64)
                b = geokernels.distance_transform(mask.cuda(), invert=invert, no_background=nb,
                                                  backend="cuda", dtype=torch.float64)
                assert torch.equal(a, b.cpu())


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("W", [6134, 6135, 6144, 6145])
def test_cuda_row_envelope_at_the_48k_shared_memory_edge(W):
    """8 W bytes of envelope plus the row kernel's static shared memory crossed the default
    48 KiB at W = 6135..6144 without the limit being raised: 'invalid argument' on every GPU."""
    mask = random_mask((1, 1, 3, W), density=0.3, seed=W)
    a = geokernels.distance_transform(mask, backend="cpu", dtype=torch.float64)
    b = geokernels.distance_transform(mask.cuda(), backend="cuda", dtype=torch.float64)
    assert torch.equal(a, b.cpu())


def test_cuda_dynamic_shared_memory_limits_are_raised_in_one_place():
    """Raising a kernel's dynamic shared-memory limit by hand (with a guess of its static part)
    is how distance.cu launched over the limit; smem.cuh's allow_dynamic_smem reads the real one."""
    from pathlib import Path

    bad = [f"{p.name}:{n}" for p in sorted((Path(__file__).parent.parent / "csrc" / "cuda")
                                            .glob("*.cu"))
           for n, line in enumerate(p.read_text().splitlines(), 1)
           if "cudaFuncAttributeMaxDynamicSharedMemorySize" in line]
    assert not bad, "use allow_dynamic_smem (smem.cuh): " + ", ".join(bad)


# ---- bad input --------------------------------------------------------------------------------
BAD = [
    (lambda: torch.ones(3, 4, 5), {}, ValueError, "mask"),
    (lambda: torch.ones(1, 1, 0, 4), {}, ValueError, "mask"),
    (lambda: torch.full((1, 1, 3, 3), float("nan")), {}, ValueError, "mask"),
    (lambda: torch.ones(1, 1, 3, 3, dtype=torch.complex64), {}, TypeError, "mask"),
    (lambda: [[1.0]], {}, TypeError, "mask"),
    (lambda: torch.ones(1, 1, 3, 3), {"dtype": torch.float16}, TypeError, "dtype"),
    (lambda: torch.ones(1, 1, 3, 3), {"no_background": "nan"}, ValueError, "no_background"),
    (lambda: torch.ones(1, 1, 3, 3), {"invert": 1}, TypeError, "invert"),
    (lambda: torch.ones(1, 1, 3, 3), {"backend": "triton"}, ValueError, "backend"),
    (lambda: torch.ones(1, 1, 3, 3), {"backend": "metal"}, ValueError, "backend"),
]


@pytest.mark.parametrize("make,kwargs,exc,name", BAD, ids=[f"{b[2].__name__}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(make, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        geokernels.distance_transform(make(), **kwargs)


def test_raw_op_rejects_bad_input():
    op = torch.ops.geokernels.distance_transform
    with pytest.raises(ValueError, match="mask must have shape"):
        op(torch.ones(4, 4), False, False, "inf")
    with pytest.raises(ValueError, match="mask must not be empty"):
        op(torch.ones(1, 1, 0, 3), False, False, "inf")
    with pytest.raises(ValueError, match="no_background"):
        op(torch.ones(1, 1, 3, 3), False, False, "zero")
    with pytest.raises(TypeError, match="real"):
        op(torch.ones(1, 1, 3, 3, dtype=torch.complex64), False, False, "inf")
