"""Double backward (create_graph=True) through the fused backends.

The fused backward kernels of qc2_loss, qc1_loss, contour_flow_loss and cfss_iterate are closed
form and have no derivative of their own, nor has cgpm's fused unroll (backprop_to_backbone). Without a guard PyTorch returns first-order gradients
disconnected from the graph, so Hessian-vector products and gradient penalties silently see
zero second derivatives. The fused backends must refuse with a clear error instead; the
reference backend ("torch") differentiates its gradient.
"""
import warnings

import pytest
import torch

import geokernels
from tests._util import assert_close_rel, backend_device_params

# op -> (make inputs on a device, the loss as a function of x and the backend)
SHAPE = (1, 1, 6, 7)


def _qc2(x, backend, extra, reduction="mean"):
    return geokernels.qc2_loss(x, reduction=reduction, backend=backend)


def _qc1(x, backend, extra, reduction="mean"):
    return geokernels.qc1_loss(x, window=3, reduction=reduction, backend=backend)


def _cfl(x, backend, extra, reduction="mean"):
    return geokernels.contour_flow_loss(x, extra, reduction=reduction, backend=backend)


def _cfss(x, backend, extra, reduction="mean"):
    z = geokernels.cfss_iterate(x, extra, iters=3, halfsize=1, backend=backend)
    return z.mean() if reduction == "mean" else z


def _cgpm(x, backend, extra, reduction="mean"):
    # backprop_to_backbone: the fused unroll's backward recomputes and steps back through the
    # Adam iterations; its own derivative is not available
    out = geokernels.cgpm(x, steps=3, backprop_to_backbone=True, backend=backend)
    return out.mean() if reduction == "mean" else out


OPS = {
    "qc2_loss": (_qc2, lambda dev: (torch.rand(SHAPE, dtype=torch.float64, device=dev), None)),
    "qc1_loss": (_qc1, lambda dev: (torch.rand(SHAPE, dtype=torch.float64, device=dev), None)),
    "contour_flow_loss": (_cfl, lambda dev: (
        torch.randn(SHAPE, dtype=torch.float64, device=dev),
        torch.randn((1, 2, 6, 7), dtype=torch.float64, device=dev))),
    "cfss_iterate": (_cfss, lambda dev: (
        torch.randn(SHAPE, dtype=torch.float64, device=dev),
        torch.nn.functional.normalize(torch.randn((1, 2, 6, 7), dtype=torch.float64), dim=1)
        .to(dev))),
    "cgpm": (_cgpm, lambda dev: (torch.randn(SHAPE, dtype=torch.float64, device=dev) * 3, None)),
}


def _params():
    for op in OPS:
        for p in backend_device_params(op):
            dev, be = p.values
            yield pytest.param(op, dev, be, id=f"{op}-{p.id}", marks=p.marks)


def _refusal(op):
    return rf"^{op}: double backward .*not supported.*backend='torch'"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("op,device,backend", list(_params()))
def test_hvp_is_refused(op, device, backend, reduction):
    fn, make = OPS[op]
    x, extra = make(device)
    x.requires_grad_()
    v = torch.randn_like(x)
    out = fn(x, backend, extra, reduction)
    loss = (out * torch.randn_like(out)).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the autograd fallback's warning is not the refusal
        with pytest.raises(RuntimeError, match=_refusal(op)):
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            torch.autograd.grad((g * v).sum(), x)


@pytest.mark.parametrize("op,device,backend", list(_params()))
def test_gradient_penalty_is_refused(op, device, backend):
    fn, make = OPS[op]
    x, extra = make(device)
    x.requires_grad_()
    loss = fn(x, backend, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=_refusal(op)):
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            (loss + (g ** 2).sum()).backward()


@pytest.mark.parametrize("op,device,backend", list(_params()))
def test_first_order_still_works(op, device, backend):
    fn, make = OPS[op]
    x, extra = make(device)
    x_ref = x.detach().cpu().requires_grad_()
    x.requires_grad_()
    with torch.enable_grad():  # ambient grad mode does not matter, only create_graph does
        (g,) = torch.autograd.grad(fn(x, backend, extra), x)
    extra_ref = None if extra is None else extra.cpu()
    (g_ref,) = torch.autograd.grad(fn(x_ref, "torch", extra_ref), x_ref)
    assert g.grad_fn is None
    assert_close_rel(g, g_ref, factor=1e3, what=f"{op} {backend} gradient")
    x.grad = None
    fn(x, backend, extra).backward()  # .backward() too
    assert_close_rel(x.grad, g_ref, factor=1e3, what=f"{op} {backend} .backward()")


@pytest.mark.parametrize("op", list(OPS))
def test_reference_supports_double_backward(op):
    fn, make = OPS[op]
    x, extra = make("cpu")
    x.requires_grad_()
    v = torch.randn_like(x)
    (g,) = torch.autograd.grad(fn(x, "torch", extra), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    assert torch.isfinite(hv).all()
    assert hv.abs().max() > 0
    # and it is the Hessian-vector product: a central difference of the gradient along v
    h = 1e-5

    def grad_at(y):
        y = y.detach().requires_grad_()
        return torch.autograd.grad(fn(y, "torch", extra), y)[0]

    fd = (grad_at(x + h * v) - grad_at(x - h * v)) / (2 * h)
    torch.testing.assert_close(hv, fd, rtol=1e-4, atol=1e-6)
