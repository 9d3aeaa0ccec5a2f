"""Benchmark case of midpoint convexification (issue 3 acceptance): the paper notebook's shape,
radius 15, Jacobi to convergence, every fused backend against the reference Jacobi loop.

Each fused step's output is compared, bit for bit, with the reference's output of the same run;
a difference turns that row into an error note instead of a timing.
"""
from __future__ import annotations

import torch

import geokernels
from geokernels.benchmark import Case, register_case
from geokernels.data.synthetic import notebook_shape
from geokernels.reference import midpoint as ref


def _compiled_reference(radius: float, max_iters: int, tol: float):
    """The reference loop with its sweep compiled by torch.compile (the stop test stays eager)."""
    sweep = torch.compile(lambda u: ref.midpoint_sweep(u, radius), dynamic=False)

    def run(u):
        sweeps = 0
        while sweeps < max_iters:
            new = sweep(u)
            sweeps += 1
            change = (new - u).abs().max().item()
            u = new
            if change <= tol:
                break
        return u

    return run


@register_case(op="midpoint_convexify")
def midpoint_cases(device: torch.device, quick: bool):
    if quick:
        u, radius, label = notebook_shape(96, 30.0), 6.0, "notebook 96x96 r=6"
    else:
        u, radius, label = notebook_shape(), 15.0, "notebook 256x256 r=15"
    u = u.to(device)
    max_iters, tol = 200, 1e-9
    reference_out = {}

    def make_step(impl: str):
        if impl == "reference":
            def step():
                out = ref.midpoint_convexify(u, radius, max_iters, tol)
                reference_out.setdefault("out", out)
                return out
            return step
        if impl == "compiled":
            fn = _compiled_reference(radius, max_iters, tol)
            return lambda: fn(u)

        def step():
            out = geokernels.midpoint_convexify(u, radius, max_iters, tol, backend=impl)
            expect = reference_out.get("out")
            if expect is not None and not torch.equal(out, expect):
                raise AssertionError(f"{impl} output differs from the reference Jacobi loop")
            return out
        return step

    # the least traffic of any implementation: read u once, write the result once.
    # torch.compile(reference) only for the quick case: at r=15 the sweep is a 1416-slice graph
    # that takes minutes to compile (and the eager reference loop alone runs ~1 min per step).
    cases = [Case("midpoint_convexify", f"{label} jacobi to convergence f32", make_step,
                  nbytes=2 * u.numel() * u.element_size(), compile_reference=quick)]
    # with a gradient: the reference differentiates its max/min loop (autograd through every
    # sweep); the fused backends record each output's source pixel and route the gradient there
    leaf = u.detach().clone().requires_grad_()
    weights = torch.rand(u.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def make_bwd_step(impl: str):
        backend = "torch" if impl == "reference" else impl

        def step():   # (output, grad u of (weights * output).sum())
            out = geokernels.midpoint_convexify(leaf, radius, max_iters, tol, backend=backend)
            return (out.detach(),) + torch.autograd.grad((weights * out).sum(), [leaf])

        return step

    cases.append(Case("midpoint_convexify", f"fwd+bwd {label} jacobi f32", make_bwd_step,
                      nbytes=4 * u.numel() * u.element_size(), compile_reference=False))
    return cases
