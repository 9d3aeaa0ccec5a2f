"""qc1_loss (SPEC.md 1.3) and fidelity_loss (SPEC.md 1.4): every backend vs the reference."""
import itertools

import pytest
import torch

import geokernels
from geokernels import reference
from tests._util import (assert_close_rel, assert_isa_builds_agree, backend_device_params,
                         requires_cuda)

SHAPES = [(1, 1, 1, 1), (1, 1, 2, 3), (2, 3, 17, 23), (1, 1, 5, 40), (3, 1, 33, 9)]
WINDOWS = [1, 3, 7, 9]


def _input(shape, dtype, device, quantised=False):
    if quantised:  # exactly flat neighbourhoods: ux = uy = 0, every h at relu's kink
        return (torch.rand(shape, dtype=torch.float64) * 3).floor().div(3).to(dtype).to(device)
    return torch.rand(shape, dtype=dtype, device=device)


def _compare(u, backend, reduction, window):
    u_ref = u.detach().cpu().double().requires_grad_()
    u_k = u.detach().clone().requires_grad_()
    ref = reference.qc1_loss(u_ref, window=window, reduction=reduction)
    out = geokernels.qc1_loss(u_k, window=window, reduction=reduction, backend=backend)
    assert out.dtype == u.dtype and out.shape == ref.shape
    cot = torch.randn(ref.shape, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(ref, u_ref, cot)
    (g_k,) = torch.autograd.grad(out, u_k, cot.to(u.dtype).to(u.device))
    return out, ref, g_k, g_ref


def _parity_params():
    """(device, backend, dtype, reduction, window); the Triton interpreter (CPU) gets a
    representative subset (window <= 3, no "sum") so the suite stays fast."""
    out = []
    for p in backend_device_params("qc1_loss"):
        device, backend = p.values
        for dtype, dtype_id in ((torch.float64, "f64"), (torch.float32, "f32")):
            for reduction in ("mean", "sum", "none"):
                for window in WINDOWS:
                    if device == "cpu" and backend == "triton" and (window > 3 or reduction == "sum"):
                        continue
                    out.append(pytest.param(device, backend, dtype, reduction, window, marks=p.marks,
                                            id=f"{p.id}-{dtype_id}-{reduction}-w{window}"))
    return out


@pytest.mark.parametrize("device,backend,dtype,reduction,window", _parity_params())
def test_matches_reference(device, backend, dtype, reduction, window):
    interpreted = backend == "triton" and device == "cpu"
    shapes = [(1, 1, 1, 1), (1, 2, 6, 9)] if interpreted else SHAPES
    for shape in shapes:
        u = _input(shape, dtype, device)
        out, ref, g_k, g_ref = _compare(u, backend, reduction, window)
        # the reference in float64 is the oracle; float32 kernels are held to the float32 table
        assert_close_rel(out, ref, dtype, what=f"{shape} forward")
        assert_close_rel(g_k, g_ref, dtype, factor=10 if dtype == torch.float32 else 1,
                         what=f"{shape} grad")


@pytest.mark.parametrize("device,backend", backend_device_params("qc1_loss"))
def test_flat_regions_match_relu_kink(device, backend):
    # quantised values: many pixels with ux = uy = 0 (a = 0 for every offset) and with
    # ux = +-uy, where the two products of a = uy n_y + ux n_x cancel exactly on diagonal
    # offsets: relu'(0) = 0, and no FMA may move a pixel across the kink
    interpreted = backend == "triton" and device == "cpu"
    u = _input((1, 1, 7, 6) if interpreted else (2, 1, 13, 11), torch.float64, device, quantised=True)
    for reduction in ("mean", "none"):
        out, ref, g_k, g_ref = _compare(u, backend, reduction, 3 if interpreted else 5)
        assert_close_rel(out, ref, torch.float64, what="forward")
        assert_close_rel(g_k, g_ref, torch.float64, what="grad")


@pytest.mark.parametrize("device,backend", backend_device_params("qc1_loss"))
@pytest.mark.parametrize("dtype,step", [(torch.float32, 30.0), (torch.float64, 60.0)],
                         ids=["f32", "f64"])
def test_large_neighbour_differences(device, backend, dtype, step):
    # u is not always a probability (logits, distance maps): neighbours `step` apart put the
    # pair's sigmoid at 1 - 1e-13 (f32) / 1e-26 (f64). sigma' taken as w (1 - w) from that side
    # cancelled to 0 (relative gradient error 1.6 at step 30 in float32); the reference is exact
    # (an exact ramp: the whole gradient is these tails, ~1e-11, nothing else masks them)
    j = torch.arange(11, dtype=torch.float64)
    u = (step * (11 - j)).expand(2, 1, 7, 11)
    out, ref, g_k, g_ref = _compare(u.to(dtype).to(device), backend, "sum", 3)
    assert torch.isfinite(g_k).all()
    assert_close_rel(out, ref, dtype, factor=10, what="forward")
    assert_close_rel(g_k, g_ref, dtype, factor=10, what="grad")


@pytest.mark.parametrize("device,backend", backend_device_params("qc1_loss"))
def test_noncontiguous_input(device, backend):
    interpreted = backend == "triton" and device == "cpu"
    base = torch.rand((1, 2, 7, 5) if interpreted else (2, 3, 21, 19), dtype=torch.float64, device=device)
    u = base.transpose(-1, -2)
    assert not u.is_contiguous()
    out, ref, g_k, g_ref = _compare(u, backend, "none", 3)
    assert_close_rel(out, ref, torch.float64, what="forward")
    assert_close_rel(g_k, g_ref, torch.float64, what="grad")


@pytest.mark.parametrize("device,backend", backend_device_params("qc1_loss"))
def test_batch_and_channels_independent(device, backend):
    interpreted = backend == "triton" and device == "cpu"
    u = torch.rand((2, 2, 5, 4) if interpreted else (2, 2, 13, 11), dtype=torch.float64, device=device)
    window = 3 if interpreted else 5
    full = geokernels.qc1_loss(u, window=window, reduction="none", backend=backend)
    for b, c in itertools.product(range(2), range(2)):
        single = geokernels.qc1_loss(u[b:b + 1, c:c + 1], window=window, reduction="none", backend=backend)
        torch.testing.assert_close(full[b:b + 1, c:c + 1], single, rtol=0, atol=0)


def test_window_larger_than_image():
    # offsets reach far outside the image (u = 0 there) on every side
    u = torch.rand(1, 2, 4, 3, dtype=torch.float64)
    out, ref, g_k, g_ref = _compare(u, "cpu", "sum", 11)
    assert_close_rel(out, ref, torch.float64, what="forward")
    assert_close_rel(g_k, g_ref, torch.float64, what="grad")


def test_gradcheck_cpu():
    u = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    for window in (3, 5):
        assert torch.autograd.gradcheck(
            lambda x: geokernels.qc1_loss(x, window=window, reduction="none", backend="cpu"), (u,))
        assert torch.autograd.gradcheck(
            lambda x: geokernels.qc1_loss(x, window=window, reduction="mean", backend="cpu"), (u,))


@pytest.mark.triton
@pytest.mark.parametrize("device,backend", [p for p in backend_device_params("qc1_loss") if "triton" in p.id])
def test_gradcheck_triton(device, backend):
    u = torch.rand(1, 1, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: geokernels.qc1_loss(x, window=3, reduction="sum", backend="triton"), (u,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck(reduction):
    u = torch.rand(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.geokernels.qc1_loss_forward.default, (u, 5, reduction))
    grad = torch.rand(()) if reduction != "none" else torch.rand_like(u)
    torch.library.opcheck(torch.ops.geokernels.qc1_loss_backward.default,
                          (grad.double(), u.detach(), 5, reduction))
    if reduction != "none":
        torch.library.opcheck(torch.ops.geokernels.qc1_loss_value_and_grad.default, (u, 5, reduction),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_pass_value_and_grad_matches_two_pass(reduction):
    # with requires_grad the CPU backend computes loss and gradient in one pass
    u = torch.rand(2, 2, 19, 21, dtype=torch.float64)
    a, b = u.clone().requires_grad_(), u.clone()
    one_pass = geokernels.qc1_loss(a, window=5, reduction=reduction, backend="cpu")
    one_pass.backward(torch.tensor(0.7, dtype=torch.float64))
    two_pass = torch.ops.geokernels.qc1_loss_forward(b, 5, reduction)
    grad = torch.ops.geokernels.qc1_loss_backward(torch.tensor(0.7, dtype=torch.float64), b, 5, reduction)
    torch.testing.assert_close(one_pass, two_pass, rtol=1e-14, atol=0)
    torch.testing.assert_close(a.grad, grad, rtol=1e-13, atol=1e-18)
    with pytest.raises(ValueError, match="reduction"):
        torch.ops.geokernels.qc1_loss_value_and_grad(b, 5, "none")


@pytest.mark.triton
def test_opcheck_triton():
    pytest.importorskip("triton")
    from geokernels.triton import qc_loss as tq

    u = torch.rand(1, 1, 7, 9, dtype=torch.float64, requires_grad=True,
                   device="cuda" if torch.cuda.is_available() else "cpu")
    torch.library.opcheck(tq.qc1_loss_forward, (u, 3, "mean"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_double_backward_is_refused_not_wrong():
    u = torch.rand(1, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        loss = geokernels.qc1_loss(u, window=3, reduction=reduction, backend="cpu").sum()
        with pytest.raises(RuntimeError):  # when the graph is built or when it is used
            (g,) = torch.autograd.grad(loss, u, create_graph=True)
            g.sum().backward()


def test_torch_compile_fullgraph():
    u = torch.rand(2, 1, 19, 17, requires_grad=True)
    f = torch.compile(lambda x: geokernels.qc1_loss(x, window=5, backend="cpu") * 2, fullgraph=True)
    out = f(u)
    out.backward()
    u2 = u.detach().clone().requires_grad_()
    ref = geokernels.qc1_loss(u2, window=5, backend="cpu") * 2
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(u.grad, u2.grad)


def test_deterministic_and_isa_builds_agree():
    assert_isa_builds_agree(lambda u: geokernels.qc1_loss(u, backend="cpu"),
                            torch.rand(3, 2, 37, 41, dtype=torch.float32))


def test_thread_count_does_not_change_results():
    u = torch.rand(2, 1, 45, 30, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            u_k = u.clone().requires_grad_()
            loss = geokernels.qc1_loss(u_k, backend="cpu")
            loss.backward()
            results.append((loss.detach(), u_k.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    u = torch.rand(2, 1, 31, 45, device="cuda")
    ref = reference.qc1_loss(u.to(dtype).double().requires_grad_())
    u_k = u.to(dtype).requires_grad_()
    out = geokernels.qc1_loss(u_k, backend="cuda")
    assert out.dtype == dtype
    assert_close_rel(out.float(), ref.detach().float(), dtype)
    out.backward()
    assert u_k.grad.dtype == dtype and torch.isfinite(u_k.grad).all()


@requires_cuda
@pytest.mark.cuda
def test_cuda_large_window_and_image():
    u = torch.rand(1, 2, 70, 300, dtype=torch.float64, device="cuda")
    for window in (15, 31):
        out, ref, g_k, g_ref = _compare(u, "cuda", "mean", window)
        assert_close_rel(out, ref, torch.float64, what=f"window {window} forward")
        assert_close_rel(g_k, g_ref, torch.float64, what=f"window {window} grad")


# ---- bad input --------------------------------------------------------------------------------
BAD = [
    (lambda: (torch.rand(3, 4, 5),), {}, ValueError, "u"),
    (lambda: (torch.randint(0, 3, (1, 1, 4, 4)),), {}, TypeError, "u"),
    (lambda: (torch.zeros(1, 1, 0, 4),), {}, ValueError, "u"),
    (lambda: (torch.full((1, 1, 3, 3), float("nan")),), {}, ValueError, "u"),
    (lambda: (torch.full((1, 1, 3, 3), float("inf")),), {}, ValueError, "u"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"window": 4}, ValueError, "window"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"window": 0}, ValueError, "window"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"window": -3}, ValueError, "window"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"window": 65}, ValueError, "window"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"window": 3.0}, TypeError, "window"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"window": True}, TypeError, "window"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"reduction": "max"}, ValueError, "reduction"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"backend": "metal"}, ValueError, "backend"),
    (lambda: (torch.rand(1, 1, 4, 4),), {"backend": "cuda"}, ValueError, "cuda"),
    (lambda: (torch.rand(1, 1, 4, 4, dtype=torch.float16),), {}, TypeError, "u"),
    (lambda: ([[1.0]],), {}, TypeError, "u"),
]


@pytest.mark.parametrize("make,kwargs,exc,name", BAD, ids=[f"{b[2].__name__}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(make, kwargs, exc, name):
    if kwargs.get("backend") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA machine accepts backend='cuda' for CUDA tensors only; covered elsewhere")
    with pytest.raises(exc, match=name):
        geokernels.qc1_loss(*make(), **kwargs)


def test_raw_op_rejects_bad_input():
    with pytest.raises(ValueError, match="u must have shape"):
        torch.ops.geokernels.qc1_loss_forward(torch.rand(4, 4), 3, "mean")
    with pytest.raises(ValueError, match="window"):
        torch.ops.geokernels.qc1_loss_forward(torch.rand(1, 1, 4, 4), 2, "mean")
    with pytest.raises(ValueError, match="window"):
        torch.ops.geokernels.qc1_loss_backward(torch.rand(()), torch.rand(1, 1, 4, 4), -1, "mean")
    with pytest.raises(ValueError, match="reduction"):
        torch.ops.geokernels.qc1_loss_forward(torch.rand(1, 1, 4, 4), 3, "avg")
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.geokernels.qc1_loss_forward(torch.rand(1, 1, 4, 4).half(), 3, "mean")


# ---- fidelity_loss (SPEC 1.4) ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fidelity_matches_reference(dtype):
    u = torch.rand(2, 3, 17, 23, dtype=dtype)
    u0 = torch.rand(2, 3, 17, 23, dtype=dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    a, b = u.clone().requires_grad_(), u0.clone().requires_grad_()
    out = geokernels.fidelity_loss(a, b)
    ref = ((u0.double() - u.double()).clamp_min(0) ** 2).mean()
    assert out.dtype == dtype and out.shape == ()
    assert_close_rel(out, ref, dtype)
    out.backward()
    gap = (u0.double() - u.double()).clamp_min(0)
    assert_close_rel(a.grad, -2 * gap / u.numel(), dtype)
    assert_close_rel(b.grad, 2 * gap / u.numel(), dtype)
    # one-sided: raising u above u0 costs nothing
    assert geokernels.fidelity_loss(u0 + 0.1, u0).item() == 0.0


def test_fidelity_gradcheck():
    u = torch.rand(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    u0 = torch.rand(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(geokernels.fidelity_loss, (u, u0))


FID_BAD = [
    (lambda: (torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5)), ValueError, "u0"),
    (lambda: (torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4, dtype=torch.float64)), TypeError, "u0"),
    (lambda: (torch.rand(1, 1, 4, 4), torch.full((1, 1, 4, 4), float("nan"))), ValueError, "u0"),
    (lambda: (torch.full((1, 1, 4, 4), float("nan")), torch.rand(1, 1, 4, 4)), ValueError, "u"),
    (lambda: (torch.rand(4, 4), torch.rand(4, 4)), ValueError, "u"),
    (lambda: (torch.rand(1, 1, 4, 4), None), TypeError, "u0"),
]


@pytest.mark.parametrize("make,exc,name", FID_BAD, ids=[f"{b[1].__name__}-{b[2]}-{i}" for i, b in enumerate(FID_BAD)])
def test_fidelity_bad_input(make, exc, name):
    with pytest.raises(exc, match=name):
        geokernels.fidelity_loss(*make())
