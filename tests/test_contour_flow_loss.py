"""contour_flow_loss (SPEC.md 2.3): every backend vs the reference, forward and both gradients."""
import itertools

import pytest
import torch

import geokernels
from geokernels import reference
from tests._util import assert_close_rel as _assert_close_rel
from tests._util import assert_isa_builds_agree, backend_device_params, requires_cuda


def assert_close_rel(out, ref, dtype=None, factor=1.0, what=""):
    """Relative L2 check; a reference that is zero up to rounding (e.g. the logits gradient of a
    1x1 image, where |c| does not depend on u) must be matched by a kernel result that is too."""
    floor = 1e-10 if (dtype or ref.dtype) == torch.float64 else 1e-5
    if ref.detach().double().norm() <= floor:
        assert out.detach().double().norm() <= floor, f"{what}: expected ~0, got {out}"
        return
    _assert_close_rel(out, ref, dtype, factor=factor, what=what)

SHAPES = [(1, 1, 1, 1), (1, 1, 2, 3), (2, 3, 17, 23), (1, 1, 5, 40), (3, 2, 33, 9)]


def _inputs(shape, dtype, device, flat=False):
    B, C, H, W = shape
    x = torch.randn(shape, dtype=torch.float64) * 2
    if flat:  # equal neighbours: grad u exactly 0 on many pixels; zero flow vectors
        # (levels +-3, not +-30: u (1 - u) of a saturated sigmoid loses all relative precision
        # to rounding in any implementation, which would make the comparison meaningless)
        x = (torch.rand(shape, dtype=torch.float64) * 3).floor() * 3 - 3
    f = torch.randn(B, 2 * C, H, W, dtype=torch.float64)
    if flat:
        f[:, :, ::2] = 0
    return x.to(dtype).to(device), f.to(dtype).to(device)


def _compare(x, f, backend, reduction, eps=1e-8):
    x_ref = x.detach().cpu().double().requires_grad_()
    f_ref = f.detach().cpu().double().requires_grad_()
    x_k = x.detach().clone().requires_grad_()
    f_k = f.detach().clone().requires_grad_()
    ref = reference.contour_flow_loss(x_ref, f_ref, eps=eps, reduction=reduction)
    out = geokernels.contour_flow_loss(x_k, f_k, eps=eps, reduction=reduction, backend=backend)
    assert out.dtype == x.dtype and out.shape == ref.shape
    cot = torch.randn(ref.shape, dtype=torch.float64)
    g_ref = torch.autograd.grad(ref, (x_ref, f_ref), cot)
    g_k = torch.autograd.grad(out, (x_k, f_k), cot.to(x.dtype).to(x.device))
    return out, ref, g_k, g_ref


@pytest.mark.parametrize("device,backend", backend_device_params("contour_flow_loss"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(device, backend, dtype, reduction):
    cases = list(itertools.product(SHAPES, (False, True)))
    if backend == "triton" and device == "cpu":  # the interpreter is slow: a few small cases
        cases = [((1, 1, 2, 3), True), ((2, 3, 9, 7), False)]
    for shape, flat in cases:
        x, f = _inputs(shape, dtype, device, flat)
        out, ref, (gx, gf), (gx_ref, gf_ref) = _compare(x, f, backend, reduction)
        factor = 10 if dtype == torch.float32 else 1
        assert_close_rel(out, ref, dtype, what=f"{shape} flat={flat} forward")
        assert_close_rel(gx, gx_ref, dtype, factor=factor, what=f"{shape} flat={flat} grad logits")
        assert_close_rel(gf, gf_ref, dtype, factor=factor, what=f"{shape} flat={flat} grad flow")


@pytest.mark.parametrize("device,backend", backend_device_params("contour_flow_loss"))
def test_eps_band(device, backend):
    # |grad u| below eps: the clamped norm, differentiated as cosine_similarity does
    x = torch.zeros(1, 1, 6, 7, dtype=torch.float64, device=device)
    x[..., 3:, :] = 1e-6
    x[..., :, 4:] += 2e-6
    f = torch.randn(1, 2, 6, 7, dtype=torch.float64, device=device)
    for eps in (1e-8, 1e-5):
        out, ref, (gx, gf), (gx_ref, gf_ref) = _compare(x, f, backend, "sum", eps=eps)
        assert_close_rel(out, ref, torch.float64, what=f"eps={eps} forward")
        assert_close_rel(gx, gx_ref, torch.float64, what=f"eps={eps} grad logits")
        assert_close_rel(gf, gf_ref, torch.float64, what=f"eps={eps} grad flow")


@pytest.mark.parametrize("device,backend", backend_device_params("contour_flow_loss"))
@pytest.mark.parametrize("case", ["f32", "f32-zero-flow", "f32-tiny-flow", "f64-zero-flow"])
def test_tiny_gradients_flow_and_eps(device, backend, case):
    # logits far below 0 (sigmoid ~ 1e-20 in float32, ~1e-131 in float64; neighbours a level e^2
    # apart so the differences are well conditioned), a tiny eps, and flow that is zero on a row
    # (contour_flow_field's output is 0 on every mask border) or tiny everywhere. The kernels
    # computed s c / (A |a|) * a (NaN logits gradient) and (a.f) / (A F) (A F underflows:
    # 0 * inf = NaN loss); the reference, scaling each vector first, is finite
    dtype = torch.float64 if case.startswith("f64") else torch.float32
    logit0, eps = (-300.0, 1e-300) if dtype == torch.float64 else (-44.0, 1e-30)
    g = torch.Generator().manual_seed(5)
    i, j = torch.meshgrid(torch.arange(9), torch.arange(13), indexing="ij")
    level = ((i + j) % 3).to(torch.float64)
    x = (logit0 - 2.0 * level + 0.3 * torch.rand(2, 1, 9, 13, dtype=torch.float64, generator=g))
    f = torch.nn.functional.normalize(torch.randn(2, 2, 9, 13, dtype=torch.float64, generator=g),
                                      dim=1)
    if "zero-flow" in case:
        f[..., 0, :] = 0
    if "tiny-flow" in case:
        f = f * 1e-20
    x, f = x.to(dtype).to(device), f.to(dtype).to(device)
    for reduction in ("sum", "none"):
        out, ref, (gx, gf), (gx_ref, gf_ref) = _compare(x, f, backend, reduction, eps=eps)
        assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(gf).all()
        assert_close_rel(out, ref, dtype, factor=10, what=f"{reduction} forward")
        assert_close_rel(gx, gx_ref, dtype, factor=10, what=f"{reduction} grad logits")
        assert_close_rel(gf, gf_ref, dtype, factor=10, what=f"{reduction} grad flow")


@pytest.mark.parametrize("device,backend", backend_device_params("contour_flow_loss"))
def test_noncontiguous_input(device, backend):
    x = torch.randn(2, 3, 19, 13, dtype=torch.float64, device=device).transpose(-1, -2)
    f = torch.randn(2, 6, 19, 13, dtype=torch.float64, device=device).transpose(-1, -2)
    assert not x.is_contiguous() and not f.is_contiguous()
    out, ref, (gx, gf), (gx_ref, gf_ref) = _compare(x, f, backend, "mean")
    assert_close_rel(out, ref, torch.float64, what="forward")
    assert_close_rel(gx, gx_ref, torch.float64, what="grad logits")
    assert_close_rel(gf, gf_ref, torch.float64, what="grad flow")


@pytest.mark.parametrize("device,backend", backend_device_params("contour_flow_loss"))
def test_classes_pair_with_their_flow_channels(device, backend):
    # class c of a multi-class call equals a single-class call on flow channels (2c, 2c+1)
    x = torch.randn(2, 3, 11, 14, dtype=torch.float64, device=device)
    f = torch.randn(2, 6, 11, 14, dtype=torch.float64, device=device)
    full = geokernels.contour_flow_loss(x, f, reduction="none", backend=backend)
    for c in range(3):
        single = geokernels.contour_flow_loss(x[:, c:c + 1], f[:, 2 * c:2 * c + 2],
                                              reduction="none", backend=backend)
        torch.testing.assert_close(full[:, c:c + 1], single, rtol=0, atol=0)
    # mean = mean over pixels per class, then over classes (equal counts: the global mean)
    torch.testing.assert_close(geokernels.contour_flow_loss(x, f, backend=backend), full.mean())


def test_gradcheck_cpu():
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    f = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: geokernels.contour_flow_loss(a, b, reduction=red, backend="cpu"), (x, f))


@pytest.mark.triton
@pytest.mark.parametrize("device,backend", [p for p in backend_device_params("contour_flow_loss") if "triton" in p.id])
def test_gradcheck_triton(device, backend):
    x = torch.randn(1, 1, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    f = torch.randn(1, 2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: geokernels.contour_flow_loss(a, b, reduction="sum", backend="triton"), (x, f))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck(reduction):
    x = torch.randn(2, 2, 9, 10, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 4, 9, 10, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.geokernels.contour_flow_loss_forward.default, (x, f, 1e-8, reduction))
    grad = torch.rand((), dtype=torch.float64) if reduction != "none" else torch.rand_like(x)
    torch.library.opcheck(torch.ops.geokernels.contour_flow_loss_backward.default,
                          (grad, x.detach(), f.detach(), 1e-8, reduction))


@pytest.mark.triton
def test_opcheck_triton():
    pytest.importorskip("triton")
    from geokernels.triton import contour_flow as tcf

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 1, 7, 9, dtype=torch.float64, requires_grad=True, device=dev)
    f = torch.randn(1, 2, 7, 9, dtype=torch.float64, requires_grad=True, device=dev)
    torch.library.opcheck(tcf.contour_flow_loss_forward, (x, f, 1e-8, "mean"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 1, 19, 17, requires_grad=True)
    f = torch.randn(2, 2, 19, 17)
    fn = torch.compile(lambda a, b: geokernels.contour_flow_loss(a, b, backend="cpu") * 2, fullgraph=True)
    out = fn(x, f)
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    ref = geokernels.contour_flow_loss(x2, f, backend="cpu") * 2
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


def test_deterministic_and_isa_builds_agree():  # SIMD build: 2-ULP exp, rounding-level differences
    assert_isa_builds_agree(lambda x, f: geokernels.contour_flow_loss(x, f, backend="cpu"),
                            torch.randn(4, 2, 37, 41), torch.randn(4, 4, 37, 41))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    x = torch.randn(2, 1, 31, 45, device="cuda")
    f = torch.randn(2, 2, 31, 45, device="cuda")
    ref = reference.contour_flow_loss(x.to(dtype).double(), f.to(dtype).double())
    x_k = x.to(dtype).requires_grad_()
    out = geokernels.contour_flow_loss(x_k, f.to(dtype), backend="cuda")
    assert out.dtype == dtype
    assert_close_rel(out.float(), ref.float(), dtype)
    out.backward()
    assert x_k.grad.dtype == dtype and torch.isfinite(x_k.grad).all()


# ---- bad input --------------------------------------------------------------------------------
def _x(*s, **kw):
    return torch.randn(*s, **kw)


BAD = [
    (lambda: (_x(1, 1, 4, 4), _x(1, 1, 4, 4)), {}, ValueError, "flow must have shape"),
    (lambda: (_x(1, 2, 4, 4), _x(1, 2, 4, 4)), {}, ValueError, "flow must have shape"),
    (lambda: (_x(1, 1, 4, 4), _x(1, 2, 4, 5)), {}, ValueError, "flow"),
    (lambda: (_x(2, 1, 4, 4), _x(1, 2, 4, 4)), {}, ValueError, "flow"),
    (lambda: (_x(4, 4), _x(1, 2, 4, 4)), {}, ValueError, "logits"),
    (lambda: (torch.randint(0, 3, (1, 1, 4, 4)), _x(1, 2, 4, 4)), {}, TypeError, "logits"),
    (lambda: (_x(1, 1, 4, 4), torch.randint(0, 3, (1, 2, 4, 4))), {}, TypeError, "flow"),
    (lambda: (torch.zeros(1, 1, 0, 4), torch.zeros(1, 2, 0, 4)), {}, ValueError, "logits"),
    (lambda: (torch.full((1, 1, 3, 3), float("nan")), _x(1, 2, 3, 3)), {}, ValueError, "logits"),
    (lambda: (_x(1, 1, 3, 3), torch.full((1, 2, 3, 3), float("inf"))), {}, ValueError, "flow"),
    (lambda: (_x(1, 1, 4, 4), _x(1, 2, 4, 4)), {"eps": 0.0}, ValueError, "eps"),
    (lambda: (_x(1, 1, 4, 4), _x(1, 2, 4, 4)), {"reduction": "max"}, ValueError, "reduction"),
    (lambda: (_x(1, 1, 4, 4), _x(1, 2, 4, 4)), {"backend": "metal"}, ValueError, "backend"),
    (lambda: (_x(1, 1, 4, 4, dtype=torch.float16), _x(1, 2, 4, 4)), {}, TypeError, "logits"),
]


@pytest.mark.parametrize("make,kwargs,exc,match", BAD, ids=[f"{b[2].__name__}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        geokernels.contour_flow_loss(*make(), **kwargs)


def test_raw_op_rejects_bad_input():
    with pytest.raises(ValueError, match="flow must have shape"):
        torch.ops.geokernels.contour_flow_loss_forward(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), 1e-8, "mean")
    with pytest.raises(ValueError, match="reduction"):
        torch.ops.geokernels.contour_flow_loss_forward(torch.rand(1, 1, 4, 4), torch.rand(1, 2, 4, 4), 1e-8, "avg")
    for eps in (0.0, -1.0, float("nan")):   # eps = 0 with a zero flow was NaN
        with pytest.raises(ValueError, match="eps"):
            torch.ops.geokernels.contour_flow_loss_forward(torch.rand(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), eps, "mean")
        with pytest.raises(ValueError, match="eps"):
            torch.ops.geokernels.contour_flow_loss_backward(torch.ones(()), torch.rand(1, 1, 4, 4),
                                                            torch.zeros(1, 2, 4, 4), eps, "mean")
