"""midpoint_convexify (SPEC.md 1.6): every backend vs the reference Jacobi loop, bit for bit.

Values, sweep counts and gradient sources must equal the reference exactly (no arithmetic
happens); "fast" must reach the Jacobi values at convergence.
"""
import functools

import numpy as np
import pytest
import torch

import geokernels
from geokernels.data.synthetic import notebook_shape, sector_disk_mask
from geokernels.reference import midpoint as ref
from tests._util import backend_device_params, backends_for, cpu_build, requires_cuda

OP = torch.ops.geokernels.midpoint_convexify_forward
PARAMS = backend_device_params("midpoint_convexify")
TRITON_PARAMS = [p for p in PARAMS if "triton" in p.id]


def _kind_input(kind: str, shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, dtype=torch.float64, generator=g)
    if kind == "ties":  # few distinct values: exercises every tie rule of the source choice
        u = (u * 4).floor() / 4
    elif kind == "signed":  # negative values: the zeros outside the image can win (source -1)
        u = u - 0.6
    return u.to(dtype)


@functools.lru_cache(maxsize=None)
def _reference(kind, shape, dtype, seed, radius, max_iters, tol):
    """(input, out, sources, sweeps) of the reference loop, shared by every backend's test."""
    u = _kind_input(kind, shape, dtype, seed)
    out, sources, sweeps = ref.midpoint_convexify_with_sources(u, radius, max_iters, tol)
    return u, out, sources, sweeps


def _fused(u, radius, max_iters, tol, mode, backend, track=True):
    if backend == "triton":
        from geokernels.triton import midpoint as tmp

        return tmp.midpoint_convexify_forward(u, radius, max_iters, tol, mode, track)
    return OP(u, radius, max_iters, tol, mode, track)


def _check_exact(device, backend, kind, shape, dtype, radius, max_iters, tol=1e-9, seed=0):
    u, out_ref, src_ref, sweeps_ref = _reference(kind, shape, dtype, seed, radius, max_iters, tol)
    out, src, sweeps = _fused(u.to(device), radius, max_iters, tol, "jacobi", backend)
    assert out.dtype == u.dtype and out.shape == u.shape
    assert int(sweeps) == sweeps_ref, f"sweeps {int(sweeps)} != reference {sweeps_ref}"
    assert torch.equal(out.cpu(), out_ref), f"values differ at {(out.cpu() != out_ref).sum()} pixels"
    assert torch.equal(src.cpu(), src_ref), f"sources differ at {(src.cpu() != src_ref).sum()} pixels"
    return sweeps_ref


# (radius, shape): small images for big radii keep the reference loop fast
CASES = [(1.0, (2, 3, 17, 23)), (1.5, (1, 2, 21, 19)), (3.0, (2, 1, 24, 37)),
         (5.0, (1, 2, 23, 29)), (15.0, (1, 1, 33, 31))]
TRITON_CASES = [(1.0, (2, 1, 9, 11)), (1.5, (1, 2, 10, 9))]  # the interpreter is slow


@pytest.mark.parametrize("device,backend", [p for p in PARAMS if "triton" not in p.id])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("radius,shape", CASES, ids=[f"r{c[0]}" for c in CASES])
@pytest.mark.parametrize("kind", ["uniform", "ties", "signed"])
def test_jacobi_matches_reference(device, backend, dtype, radius, shape, kind):
    converged = _check_exact(device, backend, kind, shape, dtype, radius, max_iters=200)
    assert 1 <= converged < 200
    # stopped early by max_iters: still the reference's intermediate state, bit for bit
    early = max(1, converged // 2)
    _check_exact(device, backend, kind, shape, dtype, radius, max_iters=early)


@pytest.mark.triton
@pytest.mark.parametrize("device,backend", TRITON_PARAMS)
@pytest.mark.parametrize("radius,shape", TRITON_CASES, ids=[f"r{c[0]}" for c in TRITON_CASES])
def test_triton_matches_reference(device, backend, radius, shape):
    kind = "ties" if radius == 1.0 else "signed"
    converged = _check_exact(device, backend, kind, shape, torch.float32, radius, max_iters=200)
    _check_exact(device, backend, kind, shape, torch.float32, radius, max_iters=max(1, converged // 2))


@pytest.mark.parametrize("device,backend", [p for p in PARAMS if "triton" not in p.id])
@pytest.mark.parametrize("radius,kind", [(1.0, "uniform"), (3.0, "ties"), (5.0, "ties")])
def test_many_tiles_both_ways(device, backend, radius, kind):
    # the CUDA kernels work on 32x32 tiles and check convergence every 8 sweeps: an image
    # spanning 3x4 tiles, more than 8 sweeps (9, 19, 12 here), and a max_iters stop in between
    shape = (2, 3, 70, 100)
    converged = _check_exact(device, backend, kind, shape, torch.float32, radius, 300, seed=3)
    assert converged > 8
    _check_exact(device, backend, kind, shape, torch.float32, radius, converged - 3, seed=3)
    u = _kind_input(kind, shape, torch.float32, 3).to(device)
    fast, src, _ = _fused(u, radius, 1000, 0.0, "fast", backend, track=True)
    jac, _, _ = _fused(u, radius, 1000, 0.0, "jacobi", backend, track=False)
    assert torch.equal(fast, jac) and torch.equal(ref.gather_sources(u, src), fast)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_tol_stops_early_like_reference(device, backend):
    # a large tol stops as soon as the largest change is small: same sweep, same state
    tols = (0.2,) if backend == "triton" and device == "cpu" else (0.05, 0.2)
    for tol in tols:
        _check_exact(device, backend, "uniform", (1, 1, 15, 14), torch.float64, 1.5, 100, tol=tol)


# Triton's "fast" runs the Jacobi schedule (see geokernels/triton/midpoint.py): nothing to compare
@pytest.mark.parametrize("device,backend", [p for p in PARAMS if "triton" not in p.id])
@pytest.mark.parametrize("kind", ["uniform", "ties", "signed"])
def test_fast_equals_jacobi_at_convergence(device, backend, kind):
    for radius, shape in [(1.0, (2, 2, 31, 45)), (3.0, (1, 2, 40, 67)), (5.0, (2, 1, 37, 70))]:
        u = _kind_input(kind, shape, torch.float64, 1).to(device)
        jac, _, sw_j = _fused(u, radius, 1000, 0.0, "jacobi", backend, track=False)
        fast, src, sw_f = _fused(u, radius, 1000, 0.0, "fast", backend, track=True)
        assert int(sw_j) < 1000 and int(sw_f) < 1000
        assert torch.equal(fast, jac)
        assert int(sw_f) <= int(sw_j)
        # the fast schedule routes every value to a source pixel that holds it
        assert torch.equal(ref.gather_sources(u, src), fast)


@pytest.mark.parametrize("device,backend", [p for p in PARAMS if "triton" not in p.id])
def test_fast_is_faster_in_sweeps(device, backend):
    u = notebook_shape(64, 20.0, dtype=torch.float32).to(device)
    _, _, sw_j = _fused(u, 5.0, 500, 0.0, "jacobi", backend, track=False)
    _, _, sw_f = _fused(u, 5.0, 500, 0.0, "fast", backend, track=False)
    assert int(sw_f) < int(sw_j)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_public_api_and_gradient(device, backend):
    tiny = backend == "triton" and device == "cpu"
    shape = (1, 2, 10, 11) if tiny else (2, 3, 19, 26)
    for kind in ("signed",) if tiny else ("uniform", "ties", "signed"):
        u = _kind_input(kind, shape, torch.float64, 3)
        u_ref = u.clone().requires_grad_()
        out_ref, sweeps_ref = ref.midpoint_convexify(u_ref, 1.5, 4, 1e-9, return_sweeps=True)
        u_k = u.to(device).requires_grad_()
        out, sweeps = geokernels.midpoint_convexify(u_k, 1.5, 4, 1e-9, return_sweeps=True,
                                                    backend=backend)
        assert sweeps == sweeps_ref and torch.equal(out.detach().cpu(), out_ref.detach())
        cot = torch.randn(shape, dtype=torch.float64)
        (g_ref,) = torch.autograd.grad(out_ref, u_ref, cot)
        (g_k,) = torch.autograd.grad(out, u_k, cot.to(device))
        # same sources and the same in-order sums: bit-identical up to the reference's
        # scatter order, so a float64 tolerance at rounding level
        torch.testing.assert_close(g_k.cpu(), g_ref, rtol=1e-13, atol=1e-15)


@pytest.mark.cuda   # runs everywhere; selected by gpu_check.sh's -m cuda, where it covers CUDA
def test_backends_gradients_bit_identical():
    u = _kind_input("ties", (1, 2, 11, 13), torch.float32, 5)
    grads = []
    runs = [("cpu", b) for b in backends_for("midpoint_convexify", "cpu")]
    if torch.cuda.is_available():
        runs += [("cuda", b) for b in backends_for("midpoint_convexify", "cuda")]
    assert len(runs) >= 2
    for device, backend in runs:
        u_k = u.to(device).requires_grad_()
        out = geokernels.midpoint_convexify(u_k, 1.5, 3, backend=backend)
        (g,) = torch.autograd.grad(out, u_k, torch.linspace(-1, 1, u.numel()).view(u.shape).to(u_k.device))
        grads.append(g.cpu())
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


@pytest.mark.parametrize("device,backend", PARAMS)
def test_noncontiguous_input(device, backend):
    base = _kind_input("uniform", (2, 3, 15, 22), torch.float64, 2).to(device)
    u = base.transpose(-1, -2)
    assert not u.is_contiguous()
    out = geokernels.midpoint_convexify(u, 1.5, 3, backend=backend)
    expect, _, _ = ref.midpoint_convexify_with_sources(u.contiguous().cpu(), 1.5, 3, 1e-9, False)
    assert torch.equal(out.cpu(), expect)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_zero_iterations_and_small_radius(device, backend):
    u = _kind_input("signed", (1, 2, 7, 9), torch.float32, 4).to(device)
    out, sweeps = geokernels.midpoint_convexify(u, 3.0, max_iters=0, return_sweeps=True, backend=backend)
    assert sweeps == 0 and torch.equal(out, u) and out.data_ptr() != u.data_ptr()
    # r < 1: D is empty, one sweep changes nothing
    out, sweeps = geokernels.midpoint_convexify(u, 0.9, return_sweeps=True, backend=backend)
    assert sweeps == 1 and torch.equal(out, u)


def test_gradcheck_cpu():
    # distinct values: the routing is locally constant, so the map is locally linear
    u = torch.rand(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    for mode in ("jacobi", "fast"):
        assert torch.autograd.gradcheck(
            lambda x: geokernels.midpoint_convexify(x, 1.5, 4, mode=mode, backend="cpu"), (u,))
    assert torch.autograd.gradgradcheck(
        lambda x: geokernels.midpoint_convexify(x, 1.5, 4, backend="cpu"), (u,))


@pytest.mark.triton
@pytest.mark.parametrize("device,backend", TRITON_PARAMS)
def test_gradcheck_triton(device, backend):
    u = torch.rand(1, 1, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: geokernels.midpoint_convexify(x, 1.5, 2, backend="triton"), (u,), fast_mode=True)


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("mode", ["jacobi", "fast"])
def test_opcheck(track, mode):
    u = torch.rand(2, 3, 9, 10, dtype=torch.float64, requires_grad=track)
    torch.library.opcheck(OP.default, (u, 1.5, 4, 1e-9, mode, track))
    if track:
        _, sources, _ = OP(u.detach(), 1.5, 4, 1e-9, mode, True)
        grad = torch.rand(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.geokernels.midpoint_convexify_backward.default, (grad, sources))


@pytest.mark.triton
def test_opcheck_triton():
    pytest.importorskip("triton")
    from geokernels.triton import midpoint as tmp

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    u = torch.rand(1, 1, 6, 7, dtype=torch.float64, requires_grad=True, device=dev)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(tmp.midpoint_convexify_forward, (u, 1.0, 2, 1e-9, "jacobi", True),
                          test_utils=utils)
    _, sources, _ = tmp.midpoint_convexify_forward(u.detach(), 1.0, 2, 1e-9, "jacobi", True)
    torch.library.opcheck(tmp.midpoint_convexify_backward, (torch.rand_like(u), sources),
                          test_utils=utils)


def test_torch_compile_fullgraph():
    u = torch.rand(2, 1, 19, 17, requires_grad=True)
    f = torch.compile(lambda x: geokernels.midpoint_convexify(x, 2.0, 5, backend="cpu") * 2,
                      fullgraph=True)
    out = f(u)
    out.sum().backward()
    u2 = u.detach().clone().requires_grad_()
    expect = geokernels.midpoint_convexify(u2, 2.0, 5, backend="cpu") * 2
    expect.sum().backward()
    assert torch.equal(out, expect) and torch.equal(u.grad, u2.grad)


@pytest.mark.parametrize("mode", ["jacobi", "fast"])
def test_deterministic_threads_and_isa(mode):
    u = _kind_input("ties", (3, 2, 45, 131), torch.float32, 6)
    threads = torch.get_num_threads()
    results = []
    for isa, n in (("base", 1), ("auto", 1), ("auto", max(2, threads))):
        with cpu_build(isa, n):
            results.append(OP(u, 3.0, 300, 0.0, mode, True))
    for out, src, sweeps in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(src, results[0][1])
        assert int(sweeps) == int(results[0][2])


def test_planes_stop_together():
    # the stopping test is over the whole tensor (SPEC: max|u' - u|), so a plane that converged
    # early keeps its fixed point while the others go on, and the sweep count is shared
    a = _kind_input("uniform", (1, 1, 20, 20), torch.float64, 7)
    flat = torch.full_like(a, 0.5)
    both = torch.cat([a, flat], dim=1)
    out, sweeps = geokernels.midpoint_convexify(both, 2.0, return_sweeps=True, backend="cpu")
    alone, sweeps_alone = geokernels.midpoint_convexify(a, 2.0, return_sweeps=True, backend="cpu")
    assert sweeps == sweeps_alone and torch.equal(out[:, :1], alone) and torch.equal(out[:, 1:], flat)


# ---- the paper notebook's test shape -----------------------------------------------------------
def _solidity(mask: np.ndarray) -> float:
    from skimage.measure import regionprops

    props = regionprops(mask.astype(np.uint8))
    assert len(props) == 1
    return float(props[0].solidity)


def test_notebook_shape_generator():
    mask = sector_disk_mask()
    u = notebook_shape()
    assert u.shape == (1, 1, 256, 256) and u.dtype == torch.float32
    assert 0 < float(u.min()) < 0.5 < float(u.max()) < 1
    assert np.array_equal((u[0, 0] >= 0.5).numpy(), mask)  # the 0.5 level is the shape
    # 135 of 360 degrees removed; the cut is at the upper left (y up)
    assert abs(mask.sum() / (np.pi * 80 ** 2) - 225 / 360) < 0.01
    assert not mask[90, 90] and not mask[127, 90]  # theta = 135, 179 degrees: removed
    assert mask[100, 170] and mask[129, 90] and mask[165, 90] and mask[165, 165]  # 33, 182, 225, 315


def test_notebook_shape_convexification():
    u = notebook_shape()
    out, sweeps = geokernels.midpoint_convexify(u, radius=15.0, max_iters=200, backend="cpu",
                                                return_sweeps=True)
    assert 90 <= sweeps <= 110  # "about 100 Jacobi sweeps"
    before, after = _solidity((u[0, 0] >= 0.5).numpy()), _solidity((out[0, 0] >= 0.5).numpy())
    assert abs(before - 0.84) < 0.015 and abs(after - 0.97) < 0.015, (before, after)
    fast = geokernels.midpoint_convexify(u, radius=15.0, max_iters=200, mode="fast", tol=0.0,
                                         backend="cpu")
    assert torch.equal(fast, out)


def test_notebook_shape_small_matches_reference():
    u = notebook_shape(48, 15.0, dtype=torch.float64)
    out, src, sweeps = ref.midpoint_convexify_with_sources(u, 4.0, 200, 1e-9)
    k_out, k_src, k_sweeps = OP(u, 4.0, 200, 1e-9, "jacobi", True)
    assert int(k_sweeps) == sweeps and torch.equal(k_out, out) and torch.equal(k_src, src)
    assert sweeps >= 3 and not torch.equal(out, u)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_exact(dtype):
    u = _kind_input("ties", (2, 1, 31, 45), torch.float32, 8).to(dtype)
    out_ref, src_ref, sw_ref = ref.midpoint_convexify_with_sources(u.float(), 3.0, 100, 0.0)
    out, src, sw = OP(u.cuda(), 3.0, 100, 0.0, "jacobi", True)
    assert out.dtype == dtype and int(sw) == sw_ref
    assert torch.equal(out.cpu().float(), out_ref) and torch.equal(src.cpu(), src_ref)


@requires_cuda
@pytest.mark.cuda
def test_cuda_notebook_shape():
    u = notebook_shape()
    cpu_out, _, cpu_sweeps = OP(u, 15.0, 200, 1e-9, "jacobi", True)
    for mode in ("jacobi", "fast"):
        out, src, sweeps = OP(u.cuda(), 15.0, 200, 1e-9 if mode == "jacobi" else 0.0, mode, True)
        assert torch.equal(out.cpu(), cpu_out)
        if mode == "jacobi":
            assert int(sweeps) == int(cpu_sweeps)
        assert torch.equal(ref.gather_sources(u, src.cpu()), cpu_out)


# ---- bad input ---------------------------------------------------------------------------------
def _u():
    return torch.rand(1, 1, 5, 6)


BAD = [
    (lambda: (torch.rand(3, 4, 5),), {}, ValueError, "u"),
    (lambda: (torch.randint(0, 3, (1, 1, 4, 4)),), {}, TypeError, "u"),
    (lambda: (torch.zeros(1, 1, 0, 4),), {}, ValueError, "u"),
    (lambda: (torch.full((1, 1, 3, 3), float("nan")),), {}, ValueError, "u"),
    (lambda: (torch.full((1, 1, 3, 3), float("-inf")),), {}, ValueError, "u"),
    (lambda: (torch.rand(1, 1, 4, 4, dtype=torch.float16),), {}, TypeError, "u"),
    (lambda: ([[1.0]],), {}, TypeError, "u"),
    (lambda: (_u(),), {"radius": -1.0}, ValueError, "radius"),
    (lambda: (_u(),), {"radius": float("nan")}, ValueError, "radius"),
    (lambda: (_u(),), {"radius": 2000.0}, ValueError, "radius"),
    (lambda: (_u(),), {"radius": "3"}, TypeError, "radius"),
    (lambda: (_u(),), {"max_iters": -1}, ValueError, "max_iters"),
    (lambda: (_u(),), {"max_iters": 2.5}, TypeError, "max_iters"),
    (lambda: (_u(),), {"tol": -1e-3}, ValueError, "tol"),
    (lambda: (_u(),), {"tol": float("inf")}, ValueError, "tol"),
    (lambda: (_u(),), {"mode": "gauss"}, ValueError, "mode"),
    (lambda: (_u(),), {"return_sweeps": 1}, TypeError, "return_sweeps"),
    (lambda: (_u(),), {"backend": "metal"}, ValueError, "backend"),
    (lambda: (_u(),), {"backend": "cuda"}, ValueError, "cuda"),
]


@pytest.mark.parametrize("make,kwargs,exc,name", BAD, ids=[f"{b[2].__name__}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(make, kwargs, exc, name):
    if kwargs.get("backend") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA machine accepts backend='cuda' for CUDA tensors only; covered elsewhere")
    with pytest.raises(exc, match=name):
        geokernels.midpoint_convexify(*make(), **kwargs)


def test_raw_op_rejects_bad_input():
    with pytest.raises(ValueError, match="u must have shape"):
        OP(torch.rand(4, 4), 1.0, 10, 1e-9, "jacobi", False)
    with pytest.raises(ValueError, match="mode"):
        OP(_u(), 1.0, 10, 1e-9, "gauss", False)
    with pytest.raises(ValueError, match="radius"):
        OP(_u(), -1.0, 10, 1e-9, "jacobi", False)
    with pytest.raises(ValueError, match="max_iters"):
        OP(_u(), 1.0, -1, 1e-9, "jacobi", False)
    with pytest.raises(ValueError, match="tol"):
        OP(_u(), 1.0, 1, -1.0, "jacobi", False)
    with pytest.raises(TypeError, match="float32 or float64"):
        OP(_u().half(), 1.0, 1, 1e-9, "jacobi", False)
    bw = torch.ops.geokernels.midpoint_convexify_backward
    with pytest.raises(ValueError, match="sources"):
        bw(_u(), torch.zeros(1, 1, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="sources"):
        bw(_u(), torch.full((1, 1, 5, 6), 30, dtype=torch.int64))
    with pytest.raises(TypeError, match="sources"):
        bw(_u(), torch.zeros(1, 1, 5, 6, dtype=torch.int32))
    # no sources recorded: differentiating is a clear error, not a wrong gradient
    u = _u().requires_grad_()
    out, _, _ = OP(u, 1.0, 2, 1e-9, "jacobi", False)
    with pytest.raises(RuntimeError, match="track_sources"):
        out.sum().backward()
