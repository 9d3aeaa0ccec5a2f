"""What compiled Triton does on a GPU and the interpreter does not, emulated on CPU.

* A Python float kernel argument arrives as float32 in compiled Triton (the interpreter keeps the
  double), so float64 losses must take their float parameters from a device tensor.
* fp32 ``tl.sqrt`` compiles to ``sqrt.approx.ftz.f32``: a subnormal input gives 0. qc2 with
  eps = 0 reaches subnormal squared gradient norms, where that gave an inf/NaN gradient.
* contour_flow's float16 path (CUDA only through the public API) must keep eps in float32.

The tests patch the kernels' launches or the interpreter's builder, so they need the interpreter
(on a GPU the real tests run the compiled kernels).
"""
import os

import numpy as np
import pytest
import torch

import geokernels
from geokernels import reference
from tests._util import assert_close_rel

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="emulates GPU behaviour under the Triton interpreter"),
]
triton = pytest.importorskip("triton")


def _kernels(module):
    return [getattr(module, n) for n in dir(module) if n.endswith("_kernel")]


@pytest.fixture
def float32_kernel_args(monkeypatch):
    """Round every Python float kernel argument of the qc2/contour_flow kernels to float32, as
    compiled Triton does; returns the list of the float arguments seen."""
    from geokernels.triton import contour_flow, qc_loss

    seen = []

    def wrap(kernel):
        run = kernel.run

        def run32(*args, **kwargs):
            def cvt(v):
                if type(v) is float:
                    seen.append(v)
                    return float(np.float32(v))
                return v
            return run(*[cvt(a) for a in args], **{k: cvt(v) for k, v in kwargs.items()})
        monkeypatch.setattr(kernel, "run", run32)

    for k in _kernels(qc_loss) + _kernels(contour_flow):
        wrap(k)
    return seen


@pytest.mark.parametrize("opts", [dict(), dict(margin=0.05, beta=3.0), dict(eps=0.0, activation="relu")],
                         ids=["defaults", "margin,beta", "eps=0,relu"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_qc2_float64_with_float32_kernel_args(float32_kernel_args, opts, reduction):
    u = torch.rand(2, 1, 9, 11, dtype=torch.float64)
    u_ref = u.clone().requires_grad_()
    u_k = u.clone().requires_grad_()
    ref = reference.qc2_loss(u_ref, reduction=reduction, **opts)
    out = geokernels.qc2_loss(u_k, reduction=reduction, backend="triton", **opts)
    cot = torch.randn(ref.shape, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(ref, u_ref, cot)
    (g_k,) = torch.autograd.grad(out, u_k, cot)
    assert float32_kernel_args == []
    assert_close_rel(out, ref, what="forward")
    assert_close_rel(g_k, g_ref, what="grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_contour_flow_float64_with_float32_kernel_args(float32_kernel_args, reduction):
    x = torch.randn(1, 2, 7, 9, dtype=torch.float64, requires_grad=True)
    f = torch.randn(1, 4, 7, 9, dtype=torch.float64, requires_grad=True)
    ref = reference.contour_flow_loss(x, f, eps=1e-8, reduction=reduction)
    out = geokernels.contour_flow_loss(x, f, eps=1e-8, reduction=reduction, backend="triton")
    cot = torch.randn(ref.shape, dtype=torch.float64)
    g_ref = torch.autograd.grad(ref, (x, f), cot)
    g_k = torch.autograd.grad(out, (x, f), cot)
    assert float32_kernel_args == []
    assert_close_rel(out, ref, what="forward")
    for a, b in zip(g_k, g_ref):
        assert_close_rel(a, b, what="grad")


@pytest.fixture
def ftz_sqrt(monkeypatch):
    """fp32 tl.sqrt as compiled (sqrt.approx.ftz.f32): a subnormal input is flushed to 0."""
    import triton.runtime.interpreter as interp

    tiny = np.finfo(np.float32).tiny

    def sqrt(x):
        if x.dtype == np.float32:
            x = np.where(np.abs(x) < tiny, np.zeros_like(x), x)
        return np.sqrt(x)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_sqrt",
                        lambda self, arg: self.unary_op(arg, sqrt))


@pytest.mark.parametrize("activation", ["softplus", "relu"])
def test_qc2_float32_eps0_tiny_gradients_with_ftz_sqrt(ftz_sqrt, activation):
    # u of order 1e-19: ux^2 + uy^2 is subnormal in float32, and eps = 0
    u = (torch.rand(1, 1, 8, 8, dtype=torch.float64) * 1e-19 + 1e-19).float()
    u_k = u.clone().requires_grad_()
    u_ref = u.double().requires_grad_()
    out = geokernels.qc2_loss(u_k, eps=0.0, activation=activation, reduction="sum", backend="triton")
    ref = reference.qc2_loss(u_ref, eps=0.0, activation=activation, reduction="sum")
    (g_k,) = torch.autograd.grad(out, u_k)
    (g_ref,) = torch.autograd.grad(ref, u_ref)
    assert torch.isfinite(g_k).all()
    assert_close_rel(g_k, g_ref, torch.float32, factor=10, what="grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_contour_flow_float32_tiny_eps_with_ftz_sqrt(ftz_sqrt, reduction):
    # logits near -46 (neighbours a level e^2 apart): sigmoid ~ 1e-20, so |grad u|^2 ~ 1e-39 is
    # subnormal in float32; with eps = 1e-30 < |grad u| the norm must not be flushed to 0 (that
    # made |c| ~ 1e10, not <= 1)
    torch.manual_seed(3)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(12), indexing="ij")
    level = ((i + j) % 3).to(torch.float64)
    x = (-44.0 - 2.0 * level + 0.3 * torch.rand(2, 1, 8, 12, dtype=torch.float64)).float()
    f = torch.nn.functional.normalize(torch.randn(2, 2, 8, 12, dtype=torch.float64), dim=1).float()
    x_k, f_k = x.clone().requires_grad_(), f.clone().requires_grad_()
    x_r, f_r = x.double().requires_grad_(), f.double().requires_grad_()
    out = geokernels.contour_flow_loss(x_k, f_k, eps=1e-30, reduction=reduction, backend="triton")
    ref = reference.contour_flow_loss(x_r, f_r, eps=1e-30, reduction=reduction)
    assert_close_rel(out, ref, torch.float32, factor=10, what="forward")
    cot = torch.randn(ref.shape, dtype=torch.float64)
    g_k = torch.autograd.grad(out, (x_k, f_k), cot.float())
    g_r = torch.autograd.grad(ref, (x_r, f_r), cot)
    for a, b in zip(g_k, g_r):
        assert torch.isfinite(a).all()
        assert_close_rel(a, b, torch.float32, factor=10, what="grad")


def test_contour_flow_float16_keeps_eps():
    from geokernels.triton import contour_flow as CF

    x = torch.randn(1, 1, 16, 16) * 3
    x[..., :8, :] = 30.0  # sigmoid == 1 exactly: grad u = 0, |a| is clamped to eps
    f = torch.nn.functional.normalize(torch.randn(1, 2, 16, 16), dim=1)
    x16, f16 = x.half(), f.half()
    out = CF.contour_flow_loss_forward(x16, f16, 1e-8, "mean")
    ref = reference.contour_flow_loss(x16.float(), f16.float(), 1e-8, "mean")
    assert_close_rel(out, ref, torch.float16)
    gx, gf = CF.contour_flow_loss_backward(torch.ones((), dtype=torch.float16), x16, f16, 1e-8, "mean")
    assert torch.isfinite(gx).all() and torch.isfinite(gf).all()


def test_cgpm_float32_small_gradients_with_ftz_sqrt(ftz_sqrt):
    # Adam's sqrt(v_hat) with v_hat subnormal (|g| < 1.1e-19, e.g. a small weight): the flushed
    # sqrt made the step lr * m_hat / adam_eps, ~1e9 times the reference's ~lr
    from geokernels.reference import dconvex as R

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 8, 9, generator=g) * 4
    o = R.cgpm_normalise(x).requires_grad_()
    u0 = torch.sigmoid(o).detach()
    (g1,) = torch.autograd.grad(R.cgpm_loss(torch.sigmoid(o), u0, "c2", 1.0), o)
    weight = 3e-20 / g1.abs()[g1 != 0].median().item()
    kw = dict(steps=1, weight=weight, adam_eps=1e-30)
    ref = geokernels.cgpm(x, backend="torch", **kw)   # float32: Adam's sign-like first step
    out = geokernels.cgpm(x, backend="triton", **kw)
    assert (out - ref).abs().max() < 1e-6
