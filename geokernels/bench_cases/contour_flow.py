"""Benchmark cases of the Contour Flow family (sizes from issue 4's acceptance criteria)."""
from __future__ import annotations

import functools

import torch

import geokernels
from geokernels import reference
from geokernels.benchmark import DRAM_SHAPE, Case, case_shapes, impl_fn, register_case

# =================================================================================================
# Exact distance transform and contour-flow field (SPEC 2.1-2.2)
# =================================================================================================


@functools.lru_cache(maxsize=4)
def _shape_masks(n: int, size: int) -> torch.Tensor:
    """(n, 1, size, size) bool masks of the synthetic shapes set: realistic distance ranges."""
    from geokernels.data.shapes import SyntheticShapes

    ds = SyntheticShapes(n, size, seed=0, noise_std=0.0, clutter=0, occlusion_prob=0.0)
    return torch.stack([ds[i][1] for i in range(n)]) > 0


def _scipy_edt_step(mask: torch.Tensor):
    """scipy.ndimage.distance_transform_edt on every plane (scipy runs on one core)."""
    import numpy as np
    from scipy import ndimage

    planes = mask.detach().cpu().numpy().reshape(-1, *mask.shape[-2:])

    def step():   # stacked into the op's (B, C, H, W) layout (a view) for the output check
        return np.stack([ndimage.distance_transform_edt(p) for p in planes]).reshape(mask.shape)

    return step


def _with_threads(n: int, fn):
    def step():
        saved = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(saved)

    return step


@register_case(op="distance_transform")
def distance_transform_cases(device: torch.device, quick: bool):
    n, size = (2, 128) if quick else (8, 512)
    mask = _shape_masks(n, size).to(device)
    shape = "x".join(map(str, mask.shape))

    def make_step(impl: str, threads: int | None = None):
        # NOTE: the "reference" row of these cases is scipy.ndimage.distance_transform_edt (one
        # core, on a CPU copy), the external oracle the acceptance criterion names; the
        # pure-PyTorch reference (O(HW(H+W)) min-plus) is the tests' oracle, far too slow here.
        if impl == "reference":
            return _scipy_edt_step(mask)
        fn = functools.partial(geokernels.distance_transform, mask, backend=impl)
        return _with_threads(threads, fn) if threads else fn

    # bool mask in, float32 distances out
    nbytes = mask.numel() * (1 + 4)
    cases = [Case("distance_transform", f"{shape} bool->f32 (ref = scipy, 1 core)", make_step,
                  nbytes=nbytes, compile_reference=False, reference_memory=False)]
    if device.type == "cpu":
        cases.append(Case("distance_transform", f"{shape} bool->f32, 1 thread (ref = scipy)",
                          functools.partial(make_step, threads=1), nbytes=nbytes,
                          compile_reference=False, reference_memory=False))
    return cases


@register_case(op="contour_flow_field")
def contour_flow_field_cases(device: torch.device, quick: bool):
    # the pure-PyTorch reference's EDT is O(HW(H+W)): ~30 s per call for 8x1x256x256 on two
    # loaded CPU cores, so the CPU case is smaller
    n, size = (2, 64) if quick else ((8, 256) if device.type == "cuda" else (4, 128))
    mask = _shape_masks(n, size).to(device)
    shape = "x".join(map(str, mask.shape))

    def make_step(impl: str):
        if impl == "reference":  # pure PyTorch, the separable exact EDT of the reference
            return functools.partial(reference.contour_flow_field, mask)
        return functools.partial(geokernels.contour_flow_field, mask, backend=impl)

    # bool mask in, 2 float32 maps out
    return [Case("contour_flow_field", f"{shape} bool->f32", make_step,
                 nbytes=mask.numel() * (1 + 2 * 4), compile_reference=False)]


# =================================================================================================
# Contour-flow loss / CFSS iterations (SPEC 2.3-2.4)
# =================================================================================================


@register_case(op="contour_flow_loss")
def contour_flow_loss_cases(device: torch.device, quick: bool):
    cases = []
    for shape in case_shapes(device, quick, (2, 1, 128, 128) if quick else (8, 1, 256, 256)):
        B, C, H, W = shape
        logits = torch.randn(shape, device=device, requires_grad=True)
        flow = torch.nn.functional.normalize(torch.randn(B, C, 2, H, W, device=device), dim=2)
        flow = flow.reshape(B, 2 * C, H, W).requires_grad_()

        def make_step(impl: str, logits=logits, flow=flow):
            fn = impl_fn(impl, reference.contour_flow_loss, geokernels.contour_flow_loss)

            def step():   # (loss, grad logits, grad flow); no .grad left behind
                loss = fn(logits, flow)
                return (loss.detach(),) + torch.autograd.grad(loss, [logits, flow])

            return step

        label = "fwd+bwd " + "x".join(map(str, shape)) + " f32"
        # forward reads logits + flow; backward reads them again and writes both gradients
        nbytes = 3 * (logits.numel() + flow.numel()) * logits.element_size()
        cases.append(Case("contour_flow_loss", label, make_step, nbytes=nbytes,
                          compile_reference=shape != DRAM_SHAPE))
    return cases


@register_case(op="cfss_iterate")
def cfss_cases(device: torch.device, quick: bool):
    shape = (1, 1, 64, 64) if quick else (4, 1, 128, 128)
    iters = 10 if quick else 50
    B, C, H, W = shape
    gen = torch.Generator().manual_seed(0)
    o = (torch.randn(shape, generator=gen) * 2).to(device).requires_grad_()
    T = torch.nn.functional.normalize(torch.randn(B, 2, H, W, generator=gen), dim=1).to(device)
    T.requires_grad_()
    cases = []
    for checkpoint in ("auto", "recompute"):
        def make_step(impl: str, checkpoint=checkpoint):
            if impl == "reference":
                fn = functools.partial(reference.cfss_iterate, iters=iters)
            elif impl == "compiled":
                fn = torch.compile(functools.partial(reference.cfss_iterate, iters=iters))
            else:
                fn = functools.partial(geokernels.cfss_iterate, iters=iters, checkpoint=checkpoint,
                                       backend=impl)

            def step():   # (z, grad o, grad T of z.sum()); no .grad left behind
                z = fn(o, T)
                return (z.detach(),) + torch.autograd.grad(z.sum(), [o, T])

            return step

        label = f"fwd+bwd {iters} it " + "x".join(map(str, shape)) + f" f32 checkpoint={checkpoint}"
        # per iteration a fused kernel reads u, q, o, T (4 planes + 1) and writes u, q
        nbytes = iters * 3 * 7 * o.numel() * o.element_size()
        # compiling the 50-iteration unrolled loop and its backward takes minutes: off
        cases.append(Case("cfss_iterate", label, make_step, nbytes=nbytes, compile_reference=False))
    return cases
