"""Local midpoint convexification (SPEC.md 1.6): public API, fake kernels and autograd.

The C++/CUDA kernels are ``torch.ops.geokernels.midpoint_convexify_forward/backward``. The forward
returns ``(out, sources, sweeps)``: with ``track_sources`` it also records, for every output pixel,
the flat index (within its plane) of the input pixel its value is a copy of (-1: the zero outside
the image); the backward adds each output gradient to that source pixel. The routing rule (ties
included) is defined in ``geokernels/reference/midpoint.py`` and ``csrc/cpu/midpoint_common.h``.
"""
from __future__ import annotations

import torch

from geokernels import _extension
from geokernels._backend import register_op, resolve
from geokernels.ops._autocast import float32_under_autocast
from geokernels.ops._validate import check_choice, check_image, check_int, check_real
from geokernels.reference import midpoint as _ref

MIDPOINT_MODES = _ref.MODES
MAX_RADIUS = 1024.0  # |D(r)| grows as pi r^2 and every plane is padded by floor(r)

register_op("midpoint_convexify", ("cpu", "cuda", "triton"))


@float32_under_autocast
def midpoint_convexify(
    u: torch.Tensor,
    radius: float = 1.0,
    max_iters: int = 100,
    tol: float = 1e-9,
    mode: str = "jacobi",
    return_sweeps: bool = False,
    backend: str = "auto",
):
    """Local midpoint convexification of a mask function (SPEC.md 1.6).

    One sweep sets ``u'(q) = max(u(q), max_{d in D(r)} min(u(q-d), u(q+d)))`` with
    ``D(r) = {d != 0 : |d| <= r}`` (|D| = 4, 12, 28, 80, 708 for r = 1, 2, 3, 5, 15) and zeros
    outside the image; sweeps repeat while ``max|u' - u| > tol`` (over the whole tensor) and
    fewer than ``max_iters`` have run. Each output value is a copy of an input value, so results
    are exact (bit-identical across backends) in every dtype.

    Args:
        u: (B, C, H, W) float32/float64 (float16/bfloat16 on CUDA). Planes are swept together:
            the stopping test and the sweep count are over the whole tensor.
        radius: r >= 0 (<= 1024); r < 1 leaves u unchanged.
        max_iters: the most sweeps (passes, for mode="fast") to run; 0 returns a copy of u.
        tol: stop after the first sweep whose largest change is <= tol (0: exact fixed point).
        mode: "jacobi" — the published iteration, exactly, also when ``max_iters`` stops it
            early; "fast" — the backend's faster schedule (in-place Gauss-Seidel passes on CPU,
            several sweeps per launch on CUDA; Jacobi on Triton). Run to convergence it returns
            the same values as "jacobi" (the least fixed point above u) — when tol is 0 or below
            the smallest non-zero change; the gradient then routes along its own schedule.
        return_sweeps: also return the number of sweeps (passes) run, as an int (a host sync
            on CUDA).
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (reference).

    Returns:
        ``out`` (shape and dtype of u), or ``(out, sweeps)`` with ``return_sweeps=True``.

    Gradient: every output value is a copy of one input pixel (its source); the backward adds
    each output gradient to its source. A pixel that did not rise is its own source; a risen
    pixel q with new value v copies q + e for the first offset e of D(r) in row-major order of
    (dy, dx) with u(q+e) == v and u(q-e) >= v; sources compose through the sweeps.
    """
    check_image(u, "u")
    radius = check_real(radius, "radius", min_value=0.0, max_value=MAX_RADIUS)
    max_iters = check_int(max_iters, "max_iters", min_value=0)
    tol = check_real(tol, "tol", min_value=0.0)
    check_choice(mode, "mode", MIDPOINT_MODES)
    if not isinstance(return_sweeps, bool):
        raise TypeError(f"return_sweeps must be a bool, got {type(return_sweeps).__name__}")
    be = resolve("midpoint_convexify", backend, u)
    if be == "torch":
        return _ref.midpoint_convexify(u, radius, max_iters, tol, mode, return_sweeps)
    track = torch.is_grad_enabled() and u.requires_grad
    if be == "triton":
        from geokernels.triton import midpoint as _triton_mp

        out, _, sweeps = _triton_mp.midpoint_convexify_forward(u, radius, max_iters, tol, mode, track)
    else:
        out, _, sweeps = torch.ops.geokernels.midpoint_convexify_forward(
            u, radius, max_iters, tol, mode, track)
    if return_sweeps:
        return out, int(sweeps)
    return out


# ---- fake kernels and autograd (shared with the Triton ops) ------------------------------------
def forward_fake(u, radius, max_iters, tol, mode, track_sources):
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    shape = u.shape if track_sources else (0,)
    sources = u.new_empty(shape, dtype=torch.int64)
    return out, sources, u.new_empty((), dtype=torch.int64)


def backward_fake(grad, sources):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def gather_from_sources(values: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """out[q] = values[sources[q]] per plane (0 where the source is -1): the adjoint of the
    backward's scatter, i.e. the derivative of the backward with respect to its gradient."""
    B, C, H, W = values.shape
    flat = torch.nn.functional.pad(values.reshape(B, C, H * W), (1, 0), value=0.0)
    return torch.gather(flat, 2, (sources + 1).reshape(B, C, H * W)).view(B, C, H, W)


def make_autograd(backward_op):
    """(backward, setup_context) for a forward op returning (out, sources, sweeps)."""

    def setup_context(ctx, inputs, output):
        ctx.track_sources = inputs[5]
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_out, grad_sources, grad_sweeps):
        if grad_out is None:
            return None, None, None, None, None, None
        if not ctx.track_sources:
            raise RuntimeError(
                "midpoint_convexify_forward was called with track_sources=False, so it cannot be "
                "differentiated; call it with track_sources=True (geokernels.midpoint_convexify "
                "does this when u requires grad)")
        (sources,) = ctx.saved_tensors
        return backward_op(grad_out, sources), None, None, None, None, None

    return backward, setup_context


def make_double_backward():
    """The backward op is linear in ``grad``: its derivative gathers through the sources."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward(ctx, grad_grad_u):
        (sources,) = ctx.saved_tensors
        return gather_from_sources(grad_grad_u, sources), None

    return backward, setup_context


if _extension.compiled():
    _extension.require_ops("midpoint_convexify_forward", "midpoint_convexify_backward")
    torch.library.register_fake("geokernels::midpoint_convexify_forward")(forward_fake)
    torch.library.register_fake("geokernels::midpoint_convexify_backward")(backward_fake)
    _bw, _ctx = make_autograd(torch.ops.geokernels.midpoint_convexify_backward)
    torch.library.register_autograd("geokernels::midpoint_convexify_forward", _bw, setup_context=_ctx)
    _bw2, _ctx2 = make_double_backward()
    torch.library.register_autograd("geokernels::midpoint_convexify_backward", _bw2,
                                    setup_context=_ctx2)
