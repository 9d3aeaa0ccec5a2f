"""Test helpers: relative errors, per-dtype tolerances, the backends to run on this machine."""
from __future__ import annotations

import contextlib

import pytest
import torch

import geokernels
from geokernels import _backend

# relative L2 tolerance per dtype (issue: <= 1e-12 float64, <= 1e-5 float32)
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; absolute error when ref is exactly zero."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the output"
    num = (out - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def assert_close_rel(out, ref, dtype=None, factor: float = 1.0, what: str = ""):
    dtype = dtype or ref.dtype
    err = rel_err(out, ref)
    tol = RTOL[dtype] * factor
    assert err <= tol, f"{what} relative error {err:.3e} > {tol:.1e}"


def backends_for(op: str, device: str = "cpu") -> list[str]:
    """The fused backends for ``op`` that can run here (the reference is the oracle)."""
    return [b for b in _backend.available_backends(op, device) if b != "torch"]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_params(op: str):
    """pytest params (device, backend) for every fused backend runnable on this machine."""
    params = []
    for dev in ("cpu", "cuda"):
        for b in ("cpu", "cuda", "triton"):
            marks = []
            if dev == "cuda":
                marks.append(pytest.mark.cuda)
            if b == "triton":
                marks.append(pytest.mark.triton)
            usable = (dev == "cpu" or torch.cuda.is_available()) and b in backends_for(op, dev)
            if not usable:
                marks.append(pytest.mark.skip(reason=f"{b} backend not available on {dev} here"))
            if (dev == "cpu" and b == "cuda") or (dev == "cuda" and b == "cpu"):
                continue
            params.append(pytest.param(dev, b, id=f"{dev}-{b}", marks=marks))
    return params


@contextlib.contextmanager
def cpu_build(isa: str = "auto", threads: int | None = None):
    """Run the CPU kernels with the ``isa`` build ("base": portable, "auto": the best SIMD one
    this CPU has) and ``threads`` torch threads; both are restored on exit."""
    ext = geokernels._extension.extension()
    saved = torch.get_num_threads()
    try:
        ext._set_cpu_isa(isa)
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        ext._set_cpu_isa("auto")
        torch.set_num_threads(saved)


def single_thread():
    """Generator for a module-scoped autouse fixture: the module runs on one torch thread
    (``_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)``)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def assert_isa_builds_agree(loss_fn, *inputs, tol: float = 1e-5):
    """Run ``loss_fn(*inputs)`` forward and backward with the portable ("base") CPU build and
    twice with the SIMD ("auto") one: run to run bit-identical, base vs SIMD at rounding level
    (relative error < ``tol`` for the loss and every input gradient)."""
    outs = []
    for isa in ("base", "auto", "auto"):
        with cpu_build(isa):
            leaves = [x.clone().requires_grad_() for x in inputs]
            loss = loss_fn(*leaves)
            loss.backward()
        outs.append((loss.detach(), *(x.grad for x in leaves)))
    assert all(torch.equal(a, b) for a, b in zip(outs[1], outs[2])), "SIMD build not deterministic"
    for a, b in zip(outs[0], outs[1]):
        assert rel_err(a, b) < tol
