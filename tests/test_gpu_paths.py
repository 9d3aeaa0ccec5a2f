"""GPU paths no other test reaches (session-12 coverage audit of csrc/cuda and geokernels/triton):
shared-memory opt-in tiers, float16/bfloat16 kernels, aggregation launch configurations, wide
halfsizes and radii, more than 65535 planes, very wide rows, many-block reductions and numerics
the interpreter only emulates. Every test compares the CUDA / compiled-Triton result with the C++
CPU backend (itself tested against the reference) or the float64 reference. They need a CUDA
device and skip elsewhere; benchmarks/gpu_check.sh runs them with the never-run kernels first.
Each test is a thin wrapper around a ``_check_*(device, backend, ...)`` helper.
"""
import pytest
import torch

import geokernels
from geokernels import reference
from tests._util import assert_close_rel, rel_err, requires_cuda

CUDA_ONLY = [requires_cuda, pytest.mark.cuda]


def _grad(fn, *leaves, cot=None):
    """fn(*leaves) and its vector-Jacobian product with `cot` (random if None)."""
    xs = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*xs)
    if cot is None:
        cot = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    gs = torch.autograd.grad(out, xs, cot.to(out.dtype).to(out.device))
    return out.detach(), [g.detach() for g in gs]


# =================================================================================================
# 1. tests/test_qc1_loss.py -- qc1 at windows that need the shared-memory opt-in (> 48 KiB):
#    f64: forward/mean-backward w >= 39, reduction="none" backward (weight map staged) w >= 29;
#    f32: none-backward w >= 47, forward w >= 59. Up to 171 KB per block at w = 63 f64 "none".
#    Also cgpm method="c1" with such a window (same staging, cgpm.cu qc1_prepare_smem).
# =================================================================================================
def _check_qc1_large_windows(device, backend, cases):
    for dtype, window, reduction in cases:
        u = torch.rand(1, 2, 37, 45, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(window)).to(dtype)
        f = lambda x: geokernels.qc1_loss(x, window=window, reduction=reduction, backend=backend)  # noqa: E731
        fc = lambda x: geokernels.qc1_loss(x, window=window, reduction=reduction, backend="cpu")  # noqa: E731
        out, (g,) = _grad(f, u.to(device))
        ref, (g_ref,) = _grad(fc, u)          # the CPU kernel: itself checked vs the reference
        tol = 1e-11 if dtype == torch.float64 else 1e-5
        assert rel_err(out, ref) <= tol, (dtype, window, reduction, "forward")
        assert rel_err(g, g_ref) <= 10 * tol, (dtype, window, reduction, "grad")


QC1_OPTIN_CASES = [(torch.float64, 29, "none"), (torch.float64, 41, "mean"),
                   (torch.float64, 63, "none"), (torch.float64, 63, "sum"),
                   (torch.float32, 47, "none"), (torch.float32, 63, "mean")]


@pytest.mark.cuda
@requires_cuda
def test_cuda_large_windows_shared_memory_optin():
    # CUDA only: the Triton kernels have no shared-memory tier (a runtime loop over the offsets),
    # and every window is a fresh Triton compile (~1-2 s each on the GPU machine)
    _check_qc1_large_windows("cuda", "cuda", QC1_OPTIN_CASES)


# tests/test_cgpm.py
def _check_cgpm_c1_large_window(device, backend):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 1, 20, 37, generator=g, dtype=torch.float64) * 3)
    out = geokernels.cgpm(logits.to(device), steps=3, method="c1", window=41, return_history=True,
                          backend=backend)
    ref = geokernels.cgpm(logits, steps=3, method="c1", window=41, return_history=True,
                          backend="cpu")
    assert rel_err(out[0], ref[0]) <= 1e-10 and rel_err(out[1], ref[1]) <= 1e-10


@pytest.mark.cuda
@requires_cuda
def test_cuda_c1_window_needing_shared_memory_optin():
    _check_cgpm_c1_large_window("cuda", "cuda")


# =================================================================================================
# 2. tests/test_qc2_loss.py, test_qc1_loss.py, test_contour_flow_loss.py, test_midpoint.py,
#    test_cgpm.py -- float16/bfloat16: CUDA gradients are only checked for isfinite today, the
#    "sum"/"none" reductions never run in half, and NO Triton kernel except flow_mismatch ever
#    runs a half/bf16 tensor on the GPU. The kernels compute in float32 (opmath / CDT), so the
#    half kernel on x16 must equal the float32 kernel on x16.float(), rounded once (expected
#    bit-identical; the tolerance allows one half ulp in case nvcc contracts differently).
# =================================================================================================
def _half_vs_float32(fn, inputs16, dtype, what):
    """fn(*inputs) forward + VJP in `dtype` vs in float32 on the same (exactly upcast) values and
    the same (dtype-representable) cotangent."""
    with torch.no_grad():
        shape = fn(*inputs16).shape
    cot = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    out16, g16 = _grad(fn, *inputs16, cot=cot)
    out32, g32 = _grad(fn, *[t.float() for t in inputs16], cot=cot.float())
    assert out16.dtype == dtype and all(g.dtype == dtype for g in g16), what
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}[dtype]
    pairs = [(out16, out32, "forward")] + [(a, b, f"grad{i}") for i, (a, b) in enumerate(zip(g16, g32))]
    for a, b, name in pairs:
        b16 = b.to(dtype)              # the float32 kernel's result rounded once
        if not torch.equal(a, b16):    # expected equal; allow one ulp (relative L2)
            assert rel_err(a, b16) <= ulp, f"{what} {name}: {rel_err(a, b16):.2e}"


def _check_losses_low_precision(device, backend, dtype, reductions=("mean", "sum", "none")):
    g = torch.Generator().manual_seed(1)
    u = torch.rand(2, 3, 21, 37, generator=g).to(dtype).to(device)
    x = (torch.randn(2, 3, 21, 37, generator=g) * 2).to(dtype).to(device)
    f = torch.randn(2, 6, 21, 37, generator=g).to(dtype).to(device)
    for red in reductions:
        _half_vs_float32(lambda t: geokernels.qc2_loss(t, reduction=red, backend=backend), [u], dtype, f"qc2 {red}")
        _half_vs_float32(lambda t: geokernels.qc1_loss(t, window=5, reduction=red, backend=backend), [u], dtype,
                         f"qc1 {red}")
        _half_vs_float32(lambda a, b: geokernels.contour_flow_loss(a, b, reduction=red, backend=backend), [x, f],
                         dtype, f"contour_flow {red}")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cuda_low_precision_matches_float32_kernel(dtype):
    _check_losses_low_precision("cuda", "cuda", dtype)


@pytest.mark.cuda
@requires_cuda
def test_triton_float16_matches_float32_kernel():
    # one dtype and two reductions: ~10 fresh Triton compiles (fp16 signatures), ~10-20 s
    _check_losses_low_precision("cuda", "triton", torch.float16, reductions=("mean", "none"))


# tests/test_midpoint.py: half/bf16 on Triton (never run), "fast" mode and the backward in half
def _midpoint_forward_op(backend):
    if backend == "triton":
        from geokernels.triton import midpoint as tmp
        return tmp.midpoint_convexify_forward
    return torch.ops.geokernels.midpoint_convexify_forward


def _check_midpoint_low_precision(device, backend, dtype):
    u = (torch.rand(2, 1, 31, 45, generator=torch.Generator().manual_seed(8)) * 4).floor().div(4)
    u = u.to(dtype)                                   # quarter steps: exact in half and bfloat16
    ref_out, _, ref_sw = torch.ops.geokernels.midpoint_convexify_forward(u.float(), 3.0, 100, 0.0, "jacobi", True)
    assert int(ref_sw) < 100   # converged: "fast" must reach the same values
    w = torch.linspace(-1, 1, u.numel()).view(u.shape).to(dtype)
    for mode in ("jacobi", "fast"):
        out, src, _ = _midpoint_forward_op(backend)(u.to(device), 3.0, 100, 0.0, mode, True)
        assert out.dtype == dtype and torch.equal(out.cpu().float(), ref_out), mode
        # the backward of those sources, in dtype, vs the CPU float32 backward rounded once
        g = torch.ops.geokernels.midpoint_convexify_backward(w.to(device), src) if backend != "triton" else \
            __import__("geokernels.triton.midpoint", fromlist=["_"]).midpoint_convexify_backward(w.to(device), src)
        g32 = torch.ops.geokernels.midpoint_convexify_backward(w.float(), src.cpu())
        assert g.dtype == dtype
        assert rel_err(g, g32.to(dtype)) <= {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
                                             torch.float32: 0.0}[dtype], mode
        # and through autograd (the public API)
        leaf = u.to(device).requires_grad_()
        o = geokernels.midpoint_convexify(leaf, 3.0, 100, 0.0, mode=mode, backend=backend)
        (g_api,) = torch.autograd.grad(o, leaf, w.to(device))
        assert torch.equal(g_api, g), mode


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_gpu_low_precision_fast_mode_and_backward(backend, dtype):
    _check_midpoint_low_precision("cuda", backend, dtype)


# =================================================================================================
# 3. tests/test_flow_mismatch.py -- aggregation launch configurations never run on the GPU:
#    CUDA order statistic with 64 / 32 threads per block (f32 K in 25..96, f64 K in 13..48);
#    Triton K > 32: STREAM kernels for mean/min/max (never even compiled for sm_90 by
#    test_triton_compile), AGG_LOOP in f32/f64; Triton AGG_PAIRS at KP = 16/32 (BLOCK 16).
# =================================================================================================
def _check_flow_mismatch_k(device, backend, K, aggs, dtypes, chunk=None, seeded=True):
    from tests.test_flow_mismatch import MixingModel, _inputs
    B, C, H, W, T = 2, 2, 6, 7, 2            # H*W = 42: not a multiple of 4
    for dtype in dtypes:
        x, noise = _inputs(B, C, H, W, K, dtype)
        noise[:, K // 2:K // 2 + 5] = noise[:, 0:5]   # exact ties
        model = MixingModel(C)
        for agg in aggs:
            ref = reference.flow_mismatch(model, x.double(), K=K, T=T, agg=agg, noise=noise.double())
            out = geokernels.flow_mismatch(model, x.to(device), K=K, T=T, agg=agg, noise=noise.to(device),
                                           chunk=chunk, backend=backend)
            assert_close_rel(out, ref, dtype, factor=3, what=f"{backend} K={K} {agg} {dtype}")
            if not seeded:
                continue
            # regenerated noise: the GPU backend must equal the CPU kernels
            a = geokernels.flow_mismatch(model, x.to(device), K=K, T=T, agg=agg, seed=3, chunk=chunk,
                                         backend=backend)
            b = geokernels.flow_mismatch(model, x, K=K, T=T, agg=agg, seed=3, backend="cpu")
            assert_close_rel(a, b.double(), dtype, factor=10, what=f"{backend} K={K} {agg} seed")


AGGS_ALL = ["min", "mean", "median", "quantile:0.3", "quantile:1"]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("K", [20, 40, 60])   # f32: 128/64/32 threads; f64: 64/32/global
def test_cuda_order_statistic_block_sizes(K):
    _check_flow_mismatch_k("cuda", "cuda", K, ["median", "quantile:1"], [torch.float32, torch.float64])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("K,aggs", [(20, ["median"]),                   # AGG_PAIRS, KP = 32, BLOCK 16
                                    (40, ["min", "mean", "quantile:1", "median"])])  # STREAM x3, AGG_LOOP
def test_triton_many_paths_on_gpu(K, aggs):
    # explicit noise only (the Philox path is covered at K = 5): ~7 fresh compiles
    _check_flow_mismatch_k("cuda", "triton", K, aggs, [torch.float32], seeded=False)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_many_paths_chunked(backend):
    # chunk < K: delta op + aggregate kernel (Triton STREAM aggregate, CUDA aggregate_kernel)
    _check_flow_mismatch_k("cuda", backend, 40, ["mean", "min", "median"], [torch.float32], chunk=16,
                           seeded=backend == "cuda")


# NaN through the paths that do not hold mismatches in registers/shared memory
@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend,K,chunk", [("cuda", 100, None), ("cuda", 5, 2), ("cuda", 40, None),
                                             ("triton", 40, None)])   # STREAM min/mean, AGG_LOOP median
def test_gpu_nan_propagates_through_buffer_paths(backend, K, chunk):
    from tests.test_flow_mismatch import _poisoned
    x = torch.rand(1, 1, 4, 5, device="cuda")
    for agg in ("min", "median", "mean"):
        out = geokernels.flow_mismatch(_poisoned(float("nan")), x, K=K, T=2, agg=agg, chunk=chunk,
                                       backend=backend)
        assert torch.isnan(out[0, 1, 2]) and torch.isnan(out).sum() == 1, agg


# =================================================================================================
# 4. tests/test_cfss.py -- the CUDA reverse kernel only ever ran at halfsize <= 3 (staged region
#    up to 22 x 38); its shared-memory opt-in (f64, halfsize >= 6) never ran; forward f32 at
#    halfsize 16 (73.7 KB); cfss_init_kernel's grid-stride loop (> 1,048,576 elements).
#    Triton cfss with HALF > 3 never ran on a GPU.
# =================================================================================================
def _check_cfss_wide_halfsize(device, backend, dtype, halfsize, shape=(1, 2, 37, 70), iters=3,
                              checkpoints=("store", "recompute")):
    g = torch.Generator().manual_seed(halfsize)
    o = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    B, C, H, W = shape
    T = torch.nn.functional.normalize(torch.randn(B, C, 2, H, W, generator=g, dtype=torch.float64), dim=2)
    T = T.reshape(B, 2 * C, H, W).to(dtype)
    sig = torch.tensor(3.0, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for ck in checkpoints:
        kw = dict(iters=iters, halfsize=halfsize, q_nonneg=True, checkpoint=ck)
        out, gs = _grad(lambda a, b, s: geokernels.cfss_iterate(a, b, sigma=s, backend=backend, **kw),
                        o.to(device), T.to(device), sig.to(device))
        ref, gs_ref = _grad(lambda a, b, s: geokernels.cfss_iterate(a, b, sigma=s, backend="cpu", **kw),
                            o, T, sig)
        assert rel_err(out, ref) <= tol, (halfsize, ck, "z")
        for name, a, b in zip(("o", "T", "sigma"), gs, gs_ref):
            assert rel_err(a, b) <= 10 * tol, (halfsize, ck, name)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend,dtype,halfsize", [
    ("cuda", torch.float64, 4), ("cuda", torch.float64, 6), ("cuda", torch.float64, 16),
    ("cuda", torch.float32, 16),
    ("triton", torch.float64, 6)])          # Triton HALF=16 unrolls 33 taps: slow to compile
def test_gpu_wide_halfsize_forward_and_backward(backend, dtype, halfsize):
    _check_cfss_wide_halfsize("cuda", backend, dtype, halfsize)


@pytest.mark.cuda
@requires_cuda
def test_cuda_init_kernel_grid_stride():
    # > 4096 * 256 elements: cfss_init_kernel loops (backward, first segment and bisection)
    _check_cfss_wide_halfsize("cuda", "cuda", torch.float32, 1, shape=(1, 1, 1030, 1024), iters=2)


# =================================================================================================
# 5. every tile kernel: B*C > 65535 planes (grid z capped at 65535, each block loops over planes,
#    reductions fold several planes per block). Files: test_qc2_loss.py, test_qc1_loss.py,
#    test_contour_flow_loss.py, test_cfss.py, test_cgpm.py, test_midpoint.py.
# =================================================================================================
def _check_many_planes(device, backend, planes=(410, 161)):   # 66010 planes of 5 x 6
    g = torch.Generator().manual_seed(0)
    B, C = planes
    u = torch.rand(B, C, 5, 6, dtype=torch.float64, generator=g)
    f = torch.randn(B, 2 * C, 5, 6, dtype=torch.float64, generator=g)
    for red in ("mean", "none"):
        for name, fn, xs in [
            ("qc2", lambda t: geokernels.qc2_loss(t, reduction=red, backend=backend), [u]),
            ("qc1", lambda t: geokernels.qc1_loss(t, window=3, reduction=red, backend=backend), [u]),
            ("cfl", lambda a, b: geokernels.contour_flow_loss(a, b, reduction=red, backend=backend), [u, f]),
        ]:
            cpu_fn = {"qc2": lambda t: geokernels.qc2_loss(t, reduction=red, backend="cpu"),
                      "qc1": lambda t: geokernels.qc1_loss(t, window=3, reduction=red, backend="cpu"),
                      "cfl": lambda a, b: geokernels.contour_flow_loss(a, b, reduction=red, backend="cpu")}[name]
            out, gs = _grad(fn, *[x.to(device) for x in xs])
            ref, gs_ref = _grad(cpu_fn, *xs)
            assert rel_err(out, ref) <= 1e-12, (name, red)
            for a, b in zip(gs, gs_ref):
                assert rel_err(a, b) <= 1e-12, (name, red, "grad")
    o, T = u * 4 - 2, f
    z, gs = _grad(lambda a, b: geokernels.cfss_iterate(a, b, iters=3, checkpoint="store", backend=backend),
                  o.to(device), T.to(device))
    z_ref, gs_ref = _grad(lambda a, b: geokernels.cfss_iterate(a, b, iters=3, checkpoint="store", backend="cpu"),
                          o, T)
    assert rel_err(z, z_ref) <= 1e-11 and all(rel_err(a, b) <= 1e-10 for a, b in zip(gs, gs_ref))
    for method, kw in (("c2", {}), ("c1", dict(window=3))):
        a = geokernels.cgpm(o.to(device), steps=3, method=method, return_history=True, backend=backend, **kw)
        b = geokernels.cgpm(o, steps=3, method=method, return_history=True, backend="cpu", **kw)
        assert rel_err(a[0], b[0]) <= 1e-11 and rel_err(a[1], b[1]) <= 1e-11, method
    if backend == "cuda":    # Triton grids are 1-D (no z cap)
        q = (u * 4).floor() / 4
        ref_out, ref_src, ref_sw = torch.ops.geokernels.midpoint_convexify_forward(q, 1.5, 50, 0.0, "jacobi", True)
        assert int(ref_sw) < 50    # converged: "fast" must reach the same values
        for mode in ("jacobi", "fast"):
            out, src, sw = torch.ops.geokernels.midpoint_convexify_forward(q.to(device), 1.5, 50, 0.0, mode, True)
            assert torch.equal(out.cpu(), ref_out), mode
            if mode == "jacobi":
                assert torch.equal(src.cpu(), ref_src) and int(sw) == int(ref_sw)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.slow
def test_cuda_more_than_65535_planes():
    _check_many_planes("cuda", "cuda")


# =================================================================================================
# 6. tests/test_midpoint.py -- the Jacobi kernel reading global memory (tile + halo > 46 KiB:
#    f32 radius >= 39, f64 >= 23, half >= 61), "fast" falling back to Jacobi (tracked f32
#    radius >= 23, f64 >= 16), reach of more than one tile (radius > 32): never run.
# =================================================================================================
def _check_midpoint_big_radius(device, backend, dtype, radius, shape=(1, 2, 50, 61)):
    u = (torch.rand(shape, generator=torch.Generator().manual_seed(int(radius))) * 4).floor().div(4)
    u = (u - 0.4).to(dtype)    # signed: the zeros outside the image can win (source -1)
    ref_out, ref_src, ref_sw = torch.ops.geokernels.midpoint_convexify_forward(u, radius, 200, 0.0, "jacobi", True)
    assert int(ref_sw) < 200   # converged: "fast" must reach the same values
    op = _midpoint_forward_op(backend)
    out, src, sw = op(u.to(device), radius, 200, 0.0, "jacobi", True)
    assert torch.equal(out.cpu(), ref_out) and torch.equal(src.cpu(), ref_src) and int(sw) == int(ref_sw)
    out, src, _ = op(u.to(device), radius, 200, 0.0, "fast", True)
    assert torch.equal(out.cpu(), ref_out)
    from geokernels.reference import midpoint as ref
    assert torch.equal(ref.gather_sources(u, src.cpu()), ref_out)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype,radius", [(torch.float64, 16.0), (torch.float64, 23.5),
                                          (torch.float32, 23.0), (torch.float32, 40.0)])
def test_cuda_global_memory_jacobi_and_fast_fallback(dtype, radius):
    _check_midpoint_big_radius("cuda", "cuda", dtype, radius)


# =================================================================================================
# 7. tests/test_distance.py (runs late in gpu_check.sh: consider test_flow_field.py or moving
#    these into a "first" file) -- the row envelope with > 48 KB of shared memory actually
#    taken (only W = 1000 and W = 257 today, f64 only), the too-wide-for-shared-memory scan
#    fallback (W > ~29046 on an H200), the float32 envelope, rows > 2^20 (grid-stride row
#    kernel), and mask dtypes other than bool / float32 on CUDA.
# =================================================================================================
def _check_distance_wide_rows(device, backend):
    for W in (1000, 28000, 29100):            # envelope 8 KB; envelope 224 KB (opt-in); scan
        m = torch.ones(1, 1, 3, W, dtype=torch.bool)
        m[0, 0, 0, W // 3] = False           # one target: every row's cost bound is ~W^2
        m[0, 0, 2, W - 1] = False
        for dtype in (torch.float32, torch.float64):
            for invert in (False, True):
                a = geokernels.distance_transform(m, invert=invert, dtype=dtype, backend="cpu")
                b = geokernels.distance_transform(m.to(device), invert=invert, dtype=dtype, backend=backend)
                assert torch.equal(a, b.cpu()), (W, dtype, invert)


@pytest.mark.cuda
@requires_cuda
def test_cuda_row_envelope_opt_in_and_too_wide_rows():
    _check_distance_wide_rows("cuda", "cuda")


def _check_distance_many_rows_and_dtypes(device, backend):
    g = torch.Generator().manual_seed(1)
    m = torch.rand(1100, 1, 1000, 2, generator=g) < 0.6    # 1.1M rows > 2^20 row blocks
    m[5] = True                                            # a plane without background
    a = geokernels.distance_transform(m, backend="cpu")
    b = geokernels.distance_transform(m.to(device), backend=backend)
    assert torch.equal(a, b.cpu())
    small = torch.rand(2, 2, 19, 300, generator=g) < 0.5
    want = geokernels.distance_transform(small.to(device), dtype=torch.float64, backend=backend)
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float64):
        vals = small.to(dt) * (-3 if dt.is_signed else 3)   # negative / >1 nonzeros
        got = geokernels.distance_transform(vals.to(device), dtype=torch.float64, backend=backend)
        assert torch.equal(got, want), dt


@pytest.mark.cuda
@requires_cuda
def test_cuda_many_rows_and_all_kernel_mask_dtypes():
    _check_distance_many_rows_and_dtypes("cuda", "cuda")


# =================================================================================================
# 8. reductions with more blocks than threads (the last block's strided sum of partials) and
#    cgpm's history reduction at that size: only the bench stage (no history) reaches them.
#    tests/test_qc2_loss.py + tests/test_cgpm.py
# =================================================================================================
def _check_many_block_reductions(device, backend):
    g = torch.Generator().manual_seed(3)
    u = torch.rand(2, 1, 260, 530, generator=g, dtype=torch.float64)   # qc2: 17 x 33 x 2 = 1122 blocks
    for red in ("mean", "sum"):
        a = geokernels.qc2_loss(u.to(device), reduction=red, backend=backend)
        b = geokernels.qc2_loss(u, reduction=red, backend="cpu")
        assert rel_err(a, b) <= 1e-13, red
        a = geokernels.qc1_loss(u.to(device), window=3, reduction=red, backend=backend)
        assert rel_err(a, geokernels.qc1_loss(u, window=3, reduction=red, backend="cpu")) <= 1e-13
    logits = (u - 0.5) * 8
    for method, kw in (("c2", {}), ("c1", dict(window=3))):
        a = geokernels.cgpm(logits.to(device), steps=4, method=method, return_history=True, backend=backend, **kw)
        b = geokernels.cgpm(logits, steps=4, method=method, return_history=True, backend="cpu", **kw)
        assert rel_err(a[1], b[1]) <= 1e-12 and rel_err(a[0], b[0]) <= 1e-11, method


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_reductions_with_many_blocks(backend):
    _check_many_block_reductions("cuda", backend)


# =================================================================================================
# 9. tests/test_triton_gpu_semantics.py is skipped on the GPU (it emulates the GPU in the
#    interpreter). The real compiled kernels never see subnormal squared norms (qc2 eps = 0,
#    cgpm small gradients) or float16 contour flow with eps: run the same inputs compiled.
#    Put in tests/test_qc2_loss.py / test_cgpm.py / test_contour_flow_loss.py.
# =================================================================================================
@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("activation", ["softplus", "relu"])
def test_gpu_qc2_eps0_subnormal_gradients(backend, activation):
    u = (torch.rand(1, 1, 8, 8, dtype=torch.float64) * 1e-19 + 1e-19).float()
    out, (g,) = _grad(lambda t: geokernels.qc2_loss(t, eps=0.0, activation=activation, reduction="sum",
                                                    backend=backend), u.cuda(), cot=torch.tensor(1.0))
    ref, (g_ref,) = _grad(lambda t: reference.qc2_loss(t, eps=0.0, activation=activation, reduction="sum"),
                          u.double(), cot=torch.tensor(1.0))
    assert torch.isfinite(g).all()
    assert_close_rel(g, g_ref, torch.float32, factor=10, what="grad")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cgpm_float32_subnormal_adam_denominator(backend):
    from geokernels.reference import dconvex as R
    x = torch.randn(1, 1, 8, 9, generator=torch.Generator().manual_seed(0)) * 4
    o = R.cgpm_normalise(x).requires_grad_()
    (g1,) = torch.autograd.grad(R.cgpm_loss(torch.sigmoid(o), torch.sigmoid(o).detach(), "c2", 1.0), o)
    kw = dict(steps=1, weight=3e-20 / g1.abs()[g1 != 0].median().item(), adam_eps=1e-30)
    ref = geokernels.cgpm(x, backend="torch", **kw)
    out = geokernels.cgpm(x.cuda(), backend=backend, **kw)
    assert (out.cpu() - ref).abs().max() < 1e-6


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_contour_flow_float16_saturated_logits(backend):
    x = torch.randn(1, 1, 16, 16) * 3
    x[..., :8, :] = 30.0          # sigmoid == 1: grad u = 0, |a| clamped to eps
    f = torch.nn.functional.normalize(torch.randn(1, 2, 16, 16), dim=1)
    x16, f16 = x.half().cuda(), f.half().cuda()
    out, (gx, gf) = _grad(lambda a, b: geokernels.contour_flow_loss(a, b, backend=backend), x16, f16,
                          cot=torch.tensor(1.0))
    ref = reference.contour_flow_loss(x16.float().cpu(), f16.float().cpu())
    assert_close_rel(out.float(), ref, torch.float16)
    assert torch.isfinite(gx).all() and torch.isfinite(gf).all()


# =================================================================================================
# 10. low-risk grid-stride loops: midpoint backward segment sum (> 65535 * 256 = 16.7M pixels).
#     tests/test_midpoint.py
# =================================================================================================
@pytest.mark.cuda
@requires_cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backward_segment_sum_grid_stride(backend):
    u = torch.rand(1, 1, 4100, 4100, device="cuda")
    leaf = u.requires_grad_()
    out = geokernels.midpoint_convexify(leaf, 1.0, 1, backend=backend)
    (g,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
    # integer counts: exact whatever the summation order
    _, src, _ = torch.ops.geokernels.midpoint_convexify_forward(u.detach(), 1.0, 1, 1e-9, "jacobi", True)
    want = torch.bincount(src.flatten()[src.flatten() >= 0], minlength=u.numel()).view_as(u).float()
    assert torch.equal(g, want)
