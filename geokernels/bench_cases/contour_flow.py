"""Benchmark cases of the Contour Flow family (sizes from the issue's acceptance criteria)."""
from __future__ import annotations

import functools

import torch

import geokernels
from geokernels import reference
from geokernels.benchmark import Case, register_case

# ---- contour-flow loss / CFSS (SPEC 2.3-2.4) ------------------------------------------------


@register_case
def contour_flow_loss_cases(device: torch.device, quick: bool):
    shape = (2, 1, 128, 128) if quick else (8, 1, 256, 256)
    B, C, H, W = shape
    logits = torch.randn(shape, device=device, requires_grad=True)
    flow = torch.nn.functional.normalize(torch.randn(B, C, 2, H, W, device=device), dim=2)
    flow = flow.reshape(B, 2 * C, H, W).requires_grad_()

    def make_step(impl: str):
        if impl == "reference":
            fn = reference.contour_flow_loss
        elif impl == "compiled":
            fn = torch.compile(reference.contour_flow_loss)
        else:
            fn = functools.partial(geokernels.contour_flow_loss, backend=impl)

        def step():
            logits.grad = None
            flow.grad = None
            fn(logits, flow).backward()

        return step

    label = "fwd+bwd " + "x".join(map(str, shape)) + " f32"
    # forward reads logits + flow; backward reads them again and writes both gradients
    nbytes = 3 * (logits.numel() + flow.numel()) * logits.element_size()
    return [Case("contour_flow_loss", label, make_step, nbytes=nbytes)]


@register_case
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

            def step():
                o.grad = None
                T.grad = None
                fn(o, T).sum().backward()

            return step

        label = f"fwd+bwd {iters} it " + "x".join(map(str, shape)) + f" f32 checkpoint={checkpoint}"
        # per iteration a fused kernel reads u, q, o, T (4 planes + 1) and writes u, q
        nbytes = iters * 3 * 7 * o.numel() * o.element_size()
        # compiling the 50-iteration unrolled loop and its backward takes minutes: off
        cases.append(Case("cfss_iterate", label, make_step, nbytes=nbytes, compile_reference=False))
    return cases
