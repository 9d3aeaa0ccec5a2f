"""Benchmark cases of the D-Convexity family (sizes from the issues' acceptance criteria)."""
from __future__ import annotations

import functools

import torch

import geokernels
from geokernels import reference
from geokernels.benchmark import Case, register_case


def _loss_step(u: torch.Tensor, fn):
    def step():
        u.grad = None
        fn(u).backward()

    return step


@register_case
def qc2_cases(device: torch.device, quick: bool):
    shape = (2, 1, 128, 128) if quick else (8, 1, 256, 256)
    u = torch.rand(shape, device=device, requires_grad=True)

    def make_step(impl: str):
        if impl == "reference":
            fn = reference.qc2_loss
        elif impl == "compiled":
            fn = torch.compile(reference.qc2_loss)
        else:
            fn = functools.partial(geokernels.qc2_loss, backend=impl)
        return _loss_step(u, fn)

    label = "fwd+bwd " + "x".join(map(str, shape)) + " f32"
    # one read of u forward, one read of u and one write of grad u backward
    return [Case("qc2_loss", label, make_step, nbytes=3 * u.numel() * u.element_size())]
