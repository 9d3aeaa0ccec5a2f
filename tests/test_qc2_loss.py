"""qc2_loss (SPEC.md 1.2): every backend vs the reference, forward and input gradient."""
import itertools

import pytest
import torch

import geokernels
from geokernels import reference
from tests._util import (assert_close_rel, assert_isa_builds_agree, backend_device_params,
                         requires_cuda)

SHAPES = [(1, 1, 1, 1), (1, 1, 2, 2), (2, 3, 17, 23), (1, 1, 5, 40), (3, 1, 33, 9)]
OPTIONS = [
    dict(),
    dict(activation="relu"),
    dict(margin=0.05, beta=3.0),
    dict(margin=-0.02, activation="relu"),
    dict(eps=0.0),
    dict(eps=0.0, activation="relu", grad_threshold=0.05),
    dict(beta=40.0, margin=1.0),  # exercises the softplus linear branch (beta*x > 20)
]


def _input(shape, dtype, device, quantised=False):
    if quantised:  # many exactly-flat neighbourhoods: g = 0 with eps = 0
        return (torch.rand(shape, dtype=torch.float64) * 3).floor().div(3).to(dtype).to(device)
    return torch.rand(shape, dtype=dtype, device=device)


def _compare(u, backend, reduction, **opts):
    u_ref = u.detach().cpu().double().requires_grad_()
    u_k = u.detach().clone().requires_grad_()
    ref = reference.qc2_loss(u_ref, reduction=reduction, **opts)
    out = geokernels.qc2_loss(u_k, reduction=reduction, backend=backend, **opts)
    assert out.dtype == u.dtype and out.shape == ref.shape
    cot = torch.randn(ref.shape, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(ref, u_ref, cot)
    (g_k,) = torch.autograd.grad(out, u_k, cot.to(u.dtype).to(u.device))
    return out, ref, g_k, g_ref


@pytest.mark.parametrize("device,backend", backend_device_params("qc2_loss"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_matches_reference(device, backend, dtype, reduction, opts):
    shapes = SHAPES if backend != "triton" or device == "cuda" else SHAPES[:3]
    for shape in shapes:
        u = _input(shape, dtype, device, quantised=opts.get("eps", 1) == 0.0)
        out, ref, g_k, g_ref = _compare(u, backend, reduction, **opts)
        # the reference in float64 is the oracle; float32 kernels are held to the float32 table
        assert_close_rel(out, ref, dtype, what=f"{shape} forward")
        assert_close_rel(g_k, g_ref, dtype, factor=10 if dtype == torch.float32 else 1, what=f"{shape} grad")


@pytest.mark.parametrize("device,backend", backend_device_params("qc2_loss"))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_float32_large_values(device, backend, reduction):
    # |u| ~ 1e15 (u is not always a probability): (grad_t1 uy - grad_t2 ux) / g^2 grows like
    # |u|^3 before the division and overflowed (inf - inf = NaN past |u| ~ 7e12); the reference
    # (unit-vector form) is finite
    g = torch.Generator().manual_seed(4)
    u = (1e15 * torch.rand(2, 1, 6, 7, dtype=torch.float64, generator=g)).float().to(device)
    out, ref, g_k, g_ref = _compare(u, backend, reduction)
    assert torch.isfinite(g_k).all()
    assert_close_rel(out, ref, torch.float32, factor=10, what="forward")
    assert_close_rel(g_k, g_ref, torch.float32, factor=10, what="grad")


@pytest.mark.parametrize("device,backend", backend_device_params("qc2_loss"))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_noncontiguous_input(device, backend, reduction):
    base = torch.rand(2, 3, 29, 21, dtype=torch.float64, device=device)
    u = base.transpose(-1, -2)
    assert not u.is_contiguous()
    out, ref, g_k, g_ref = _compare(u, backend, reduction)
    assert_close_rel(out, ref, torch.float64, what="forward")
    assert_close_rel(g_k, g_ref, torch.float64, what="grad")


@pytest.mark.parametrize("device,backend", backend_device_params("qc2_loss"))
def test_batch_and_channels_independent(device, backend):
    # each (b, c) plane is independent: the map of a stack equals the maps of its planes
    u = torch.rand(3, 2, 13, 11, dtype=torch.float64, device=device)
    full = geokernels.qc2_loss(u, reduction="none", backend=backend)
    for b, c in itertools.product(range(3), range(2)):
        single = geokernels.qc2_loss(u[b:b + 1, c:c + 1], reduction="none", backend=backend)
        torch.testing.assert_close(full[b:b + 1, c:c + 1], single, rtol=0, atol=0)


def test_gradcheck_cpu():
    u = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    for opts in OPTIONS[:4]:
        assert torch.autograd.gradcheck(
            lambda x: geokernels.qc2_loss(x, reduction="none", backend="cpu", **opts), (u,))
        assert torch.autograd.gradcheck(
            lambda x: geokernels.qc2_loss(x, reduction="mean", backend="cpu", **opts), (u,))


@pytest.mark.triton
@pytest.mark.parametrize("device,backend", [p for p in backend_device_params("qc2_loss") if "triton" in p.id])
def test_gradcheck_triton(device, backend):
    u = torch.rand(1, 1, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: geokernels.qc2_loss(x, reduction="sum", backend="triton"), (u,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck(reduction):
    u = torch.rand(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    args = (1e-3, 1.0, 1e-8, 1e-5, "softplus", reduction)
    torch.library.opcheck(torch.ops.geokernels.qc2_loss_forward.default, (u,) + args)
    grad = torch.rand(()) if reduction != "none" else torch.rand_like(u)
    torch.library.opcheck(torch.ops.geokernels.qc2_loss_backward.default,
                          (grad.double(), u.detach()) + args)


@pytest.mark.triton
def test_opcheck_triton():
    pytest.importorskip("triton")
    from geokernels.triton import qc_loss as tq

    u = torch.rand(1, 1, 7, 9, dtype=torch.float64, requires_grad=True,
                   device="cuda" if torch.cuda.is_available() else "cpu")
    torch.library.opcheck(tq.qc2_loss_forward, (u, 1e-3, 1.0, 1e-8, 1e-5, "softplus", "mean"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    u = torch.rand(2, 1, 19, 17, requires_grad=True)
    f = torch.compile(lambda x: geokernels.qc2_loss(x, backend="cpu") * 2, fullgraph=True)
    out = f(u)
    out.backward()
    u2 = u.detach().clone().requires_grad_()
    ref = geokernels.qc2_loss(u2, backend="cpu") * 2
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(u.grad, u2.grad)


def test_deterministic_and_isa_builds_agree():
    assert_isa_builds_agree(lambda u: geokernels.qc2_loss(u, backend="cpu"),
                            torch.rand(4, 2, 37, 41, dtype=torch.float32))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    u = torch.rand(2, 1, 31, 45, device="cuda")
    ref = reference.qc2_loss(u.to(dtype).double().requires_grad_())
    u_k = u.to(dtype).requires_grad_()
    out = geokernels.qc2_loss(u_k, backend="cuda")
    assert out.dtype == dtype
    assert_close_rel(out.float(), ref.detach().float(), dtype)
    out.backward()
    assert u_k.grad.dtype == dtype and torch.isfinite(u_k.grad).all()


# ---- bad input --------------------------------------------------------------------------------
BAD = [
    (lambda: (torch.rand(3, 4, 5),), {}, ValueError, "u"),
    (lambda: (torch.randint(0, 3, (1, 1, 4, 4)),), {}, TypeError, "u"),
    (lambda: (torch.zeros(1, 1, 0, 4),), {}, ValueError, "u"),
    (lambda: (torch.full((1, 1, 3, 3), float("nan")),), {}, ValueError, "u"),
    (lambda: (torch.full((1, 1, 3, 3), float("inf")),), {}, ValueError, "u"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"activation": "tanh"}, ValueError, "activation"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"reduction": "max"}, ValueError, "reduction"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"backend": "metal"}, ValueError, "backend"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"backend": "cuda"}, ValueError, "cuda"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"beta": 0.0}, ValueError, "beta"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"eps": -1.0}, ValueError, "eps"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"grad_threshold": -1.0}, ValueError, "grad_threshold"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"margin": float("nan")}, ValueError, "margin"),
    (lambda: (torch.rand(1, 1, 4, 4, dtype=torch.float16),), {}, TypeError, "u"),
    (lambda: ([[1.0]],), {}, TypeError, "u"),
]


@pytest.mark.parametrize("make,kwargs,exc,name", BAD, ids=[f"{b[2].__name__}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(make, kwargs, exc, name):
    if kwargs.get("backend") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA machine accepts backend='cuda' for CUDA tensors only; covered elsewhere")
    with pytest.raises(exc, match=name):
        geokernels.qc2_loss(*make(), **kwargs)


def test_raw_op_rejects_bad_input():
    # direct torch.ops calls are checked in C++ too (no segfault on a bad tensor)
    with pytest.raises(ValueError, match="u must have shape"):
        torch.ops.geokernels.qc2_loss_forward(torch.rand(4, 4), 1e-3, 1.0, 1e-8, 1e-5, "softplus", "mean")
    with pytest.raises(ValueError, match="reduction"):
        torch.ops.geokernels.qc2_loss_forward(torch.rand(1, 1, 4, 4), 1e-3, 1.0, 1e-8, 1e-5, "softplus", "avg")
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.geokernels.qc2_loss_forward(torch.rand(1, 1, 4, 4).half(), 1e-3, 1.0, 1e-8, 1e-5, "softplus", "mean")
    # the scalar parameters too (beta = 0 was an inf loss, a NaN margin a NaN one)
    u, g = torch.rand(1, 1, 4, 4), torch.ones(())
    for margin, beta, eps, thr, name in [(1e-3, 0.0, 1e-8, 1e-5, "beta"), (float("nan"), 1.0, 1e-8, 1e-5, "margin"),
                                         (1e-3, 1.0, -1.0, 1e-5, "eps"), (1e-3, 1.0, 1e-8, float("inf"), "grad_threshold")]:
        with pytest.raises(ValueError, match=name):
            torch.ops.geokernels.qc2_loss_forward(u, margin, beta, eps, thr, "softplus", "mean")
        with pytest.raises(ValueError, match=name):
            torch.ops.geokernels.qc2_loss_backward(g, u, margin, beta, eps, thr, "softplus", "mean")
