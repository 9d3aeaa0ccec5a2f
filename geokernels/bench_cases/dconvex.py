"""Benchmark cases of the D-Convexity family (sizes from the issues' acceptance criteria)."""
from __future__ import annotations

import functools

import torch

import geokernels
from geokernels import reference
from geokernels.benchmark import DRAM_SHAPE, Case, case_shapes, impl_fn, register_case


def _loss_step(u: torch.Tensor, fn):
    """Forward + backward; returns (loss, grad u). autograd.grad leaves no .grad behind, so a
    step frees nothing that was live before it (the peak-memory baseline stays honest)."""
    def step():
        loss = fn(u)
        return (loss.detach(),) + torch.autograd.grad(loss, [u])

    return step


@register_case(op="qc2_loss")
def qc2_cases(device: torch.device, quick: bool):
    cases = []
    for shape in case_shapes(device, quick, (2, 1, 128, 128) if quick else (8, 1, 256, 256)):
        u = torch.rand(shape, device=device, requires_grad=True)

        def make_step(impl: str, u=u):
            return _loss_step(u, impl_fn(impl, reference.qc2_loss, geokernels.qc2_loss))

        label = "fwd+bwd " + "x".join(map(str, shape)) + " f32"
        # one read of u forward, one read of u and one write of grad u backward
        cases.append(Case("qc2_loss", label, make_step, nbytes=3 * u.numel() * u.element_size(),
                          compile_reference=shape != DRAM_SHAPE))
    return cases


@register_case(op="qc1_loss")
def qc1_cases(device: torch.device, quick: bool):
    shape = (2, 1, 128, 128) if quick else (8, 1, 256, 256)
    u = torch.rand(shape, device=device, requires_grad=True)

    def make_step(impl: str):
        return _loss_step(u, impl_fn(impl, reference.qc1_loss, geokernels.qc1_loss))

    label = "fwd+bwd " + "x".join(map(str, shape)) + " window 7 f32"
    return [Case("qc1_loss", label, make_step, nbytes=3 * u.numel() * u.element_size())]


def _cgpm_logits(shape, device):
    """Noisy logits of a notched disk (a non-convex mask) per image."""
    B, C, H, W = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    r = torch.sqrt(yy ** 2 + xx ** 2)
    blob = torch.where((xx > 0.1) & (yy.abs() < 0.2), (0.6 - r) * 8 - 6, (0.6 - r) * 8)
    g = torch.Generator().manual_seed(0)
    return (blob + 0.5 * torch.randn(B, C, H, W, generator=g)).to(device)


@register_case(op="cgpm")
def cgpm_cases(device: torch.device, quick: bool):
    shape, steps = ((2, 1, 64, 64), 10) if quick else ((4, 1, 256, 256), 100)
    logits = _cgpm_logits(shape, device)
    cases = []
    for method in ("c2", "c1"):
        def make_step(impl: str, method=method):
            if impl == "reference":
                return lambda: reference.cgpm(logits, steps=steps, method=method)
            return lambda: geokernels.cgpm(logits, steps=steps, method=method, backend=impl)

        label = f"{steps} steps " + "x".join(map(str, shape)) + f" {method} f32"
        # per step: read u (neighbours), u0, o, m, v; write o, m, v, u_next
        nbytes = steps * 9 * logits.numel() * logits.element_size()
        # torch.compile of a 100-step unrolled autograd loop takes longer than the benchmark.
        # rtol: the 100-step loop is chaotic (README): a 1-ulp change of the logits moves the
        # result by 2-3.5e-4 (relative L2) at the full size, so other rounding (FMA on a GPU)
        # legitimately differs by that much
        cases.append(Case("cgpm", label, make_step, nbytes=nbytes, compile_reference=False,
                          rtol=1e-2))
    # training through the projection (backprop_to_backbone): the reference differentiates its
    # unrolled loop (create_graph), the fused backends run their hand-written reverse sweep
    bshape, bsteps = ((2, 1, 32, 32), 5) if quick else ((2, 1, 128, 128), 20)
    leaf = _cgpm_logits(bshape, device).requires_grad_()

    def make_bwd_step(impl: str):
        kw = dict(steps=bsteps, method="c2", backprop_to_backbone=True)
        if impl == "reference":
            fn = functools.partial(reference.cgpm, **kw)
        else:
            fn = functools.partial(geokernels.cgpm, backend=impl, **kw)

        def step():   # (refined u, grad logits of u.sum())
            out = fn(leaf)
            return (out.detach(),) + torch.autograd.grad(out.sum(), [leaf])

        return step

    label = f"fwd+bwd {bsteps} steps " + "x".join(map(str, bshape)) + " c2 f32 backprop_to_backbone"
    # rtol: float32 gradients through 20 steps agree with the reference's float32 ones to 3e-3
    # (both ~10 % from float64: a few flat pixels where qc2's 1/|grad u| is nearly singular)
    cases.append(Case("cgpm", label, make_bwd_step, compile_reference=False, rtol=1e-2,
                      nbytes=3 * bsteps * 9 * leaf.numel() * leaf.element_size()))
    return cases
