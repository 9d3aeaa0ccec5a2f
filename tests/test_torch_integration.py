"""The ops under PyTorch's tracers and transforms, as a user's model meets them: torch.compile
with symbolic float arguments, vmap / make_fx / export (value checks step aside), and autodiff
transforms the fused backends cannot serve (a clear NotImplementedError instead of a silently
wrong forward-mode result or a cryptic functorch error). Session-11 integration audit."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import geokernels as gk


@pytest.fixture
def u():
    return torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(0))


def test_compile_fullgraph_with_a_float_argument_that_changes(u):
    """A float that takes a second value becomes symbolic: math.isfinite on it broke the graph
    ('torch.* op returned non-Tensor') for every op with a float parameter."""
    torch._dynamo.reset()
    f = torch.compile(lambda x, m: gk.qc2_loss(x, margin=m), fullgraph=True, backend="aot_eager")
    for margin in (1e-3, 2e-3, 5e-3):
        torch.testing.assert_close(f(u, margin), gk.qc2_loss(u, margin=margin))
    T = torch.nn.functional.normalize(torch.randn(2, 2, 9, 11), dim=1)
    g = torch.compile(lambda o, T, lam: gk.cfss_iterate(o, T, iters=3, lam=lam), fullgraph=True,
                      dynamic=True, backend="aot_eager")
    torch.testing.assert_close(g(u, T, 0.5), gk.cfss_iterate(u, T, iters=3, lam=0.5))
    h = torch.compile(lambda x, f, e: gk.contour_flow_loss(x, f, eps=e), fullgraph=True,
                      dynamic=True, backend="aot_eager")
    torch.testing.assert_close(h(u, T, 1e-6), gk.contour_flow_loss(u, T, eps=1e-6))



def test_compile_fullgraph_anomaly_score_with_a_topk_that_changes():
    """topk was read through str() (its exact decimal), which a symbolic float has not: a second
    topk broke the fullgraph compile. The symbolic path must give the decimal rule's k, including
    where float rounding alone would not (0.07 * 100 = 7.000000000000001 -> k = 7, not 8)."""
    torch._dynamo.reset()
    h = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(1))
    f = torch.compile(lambda x, t: gk.anomaly_score(x, topk=t), fullgraph=True,
                      backend="aot_eager")
    for topk in (0.01, 0.07, 0.29, 0.5, 1.0):
        want = gk.anomaly_score(h, topk=topk)
        k = {0.01: 1, 0.07: 7, 0.29: 29, 0.5: 50, 1.0: 100}[topk]
        top = h.reshape(3, -1).sort(dim=1, descending=True).values[:, :k].mean(dim=1)
        torch.testing.assert_close(want, h.reshape(3, -1).amax(dim=1) + top)
        torch.testing.assert_close(f(h, topk), want)


def test_vmap_and_make_fx_with_the_default_value_checks(u):
    """The NaN/Inf checks read data (bool(tensor)), which vmap's batched tensors and make_fx's
    proxies cannot give: they failed with errors that never named geokernels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PyTorch's 'no batching rule, looping' warning
        out = torch.func.vmap(lambda x: gk.qc2_loss(x[None]))(u)
    torch.testing.assert_close(out, torch.stack([gk.qc2_loss(x[None]) for x in u]))
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x: gk.qc1_loss(x))(u)
    torch.testing.assert_close(gm(u), gk.qc1_loss(u))


def test_export_smoothed_contour_flow_field():
    """The smoothed field's IEEE sqrt went through numpy, which export cannot trace."""
    m = (torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    class Field(torch.nn.Module):
        def forward(self, m):
            return gk.contour_flow_field(m, smooth_sigma=1.0)

    ep = torch.export.export(Field(), (m,))
    torch.testing.assert_close(ep.module()(m), gk.contour_flow_field(m, smooth_sigma=1.0),
                               rtol=0, atol=1e-6)


def test_forward_mode_ad_is_refused_not_silently_wrong(u):
    """The fused ops have reverse-mode autograd only; forward-mode AD dropped their tangent and
    returned a wrong JVP without a warning."""
    v = torch.randn_like(u)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="qc2_loss: forward-mode AD.*backend='torch'"):
            gk.qc2_loss(fwAD.make_dual(u, v), backend="cpu")
        jvp = fwAD.unpack_dual(gk.qc2_loss(fwAD.make_dual(u, v), backend="torch")).tangent
    with pytest.raises(NotImplementedError, match="contour_flow_loss: torch.func.jvp"):
        torch.func.jvp(lambda x: gk.contour_flow_loss(x, torch.ones(2, 2, 9, 11)), (u,), (v,))
    x = u.clone().requires_grad_()
    gk.qc2_loss(x).backward()
    torch.testing.assert_close(jvp, (x.grad * v).sum())   # the reference's JVP is right


def test_func_grad_names_the_op_and_the_way_out(u):
    with pytest.raises(NotImplementedError, match="qc1_loss: torch.func.grad.*backend='torch'"):
        torch.func.grad(lambda x: gk.qc1_loss(x))(u)
    g = torch.func.grad(lambda x: gk.qc1_loss(x, backend="torch"))(u)
    x = u.clone().requires_grad_()
    gk.qc1_loss(x).backward()
    torch.testing.assert_close(g, x.grad)
