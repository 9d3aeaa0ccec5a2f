"""Pure-PyTorch oracle of local midpoint convexification (SPEC.md 1.6).

A literal transcription of the Jacobi loop, written for clarity rather than speed; every kernel
backend is tested against it. Do not tune it to match a kernel.

Gradient routing (the contract every backend implements identically). Each sweep output is a copy
of one pixel of the sweep input; the *source* of q in one sweep is
  * q itself when u'(q) == u(q) (a pixel that did not rise keeps its value and its source), else
  * q + e for the first offset e of D(r) in row-major order of (dy, dx) with
    u(q + e) == u'(q) and u(q - e) >= u'(q)   (the pair (q+e, q-e) realises the max, and
    q + e is the member of the pair that holds the value).
Sources compose through the sweeps, so the final source of q is a pixel of the input (a flat
index y * W + x within its plane), or -1 when the value is a copy of the zero outside the image
(possible only for negative inputs); the backward adds the output gradient of q to its source.
"""
from __future__ import annotations

import math

import torch

MODES = ("jacobi", "fast")


def midpoint_offsets(radius: float) -> list[tuple[int, int]]:
    """D(r) = {(dy, dx) != 0 : dy^2 + dx^2 <= r^2} in row-major order of (dy, dx)."""
    if not (radius >= 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    reach = int(math.floor(radius))
    r2 = float(radius) * float(radius)
    return [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
            if (dy, dx) != (0, 0) and dy * dy + dx * dx <= r2]


def _shifted(padded: torch.Tensor, reach: int, dy: int, dx: int, H: int, W: int) -> torch.Tensor:
    """The map q -> f(q + (dy, dx)) of a tensor zero/-1 padded by ``reach`` on each side."""
    return padded[..., reach + dy: reach + dy + H, reach + dx: reach + dx + W]


def midpoint_sweep(u: torch.Tensor, radius: float, sources: torch.Tensor | None = None):
    """One Jacobi sweep ``u'(q) = max(u(q), max_d min(u(q-d), u(q+d)))``, values outside = 0.

    With ``sources`` (int64, shape of u: the input pixel each value of u is a copy of), also
    returns the sources of u' by the routing rule in the module docstring.
    """
    H, W = u.shape[-2:]
    offsets = midpoint_offsets(radius)
    reach = max((abs(dy) for dy, _ in offsets), default=0)
    padded = torch.nn.functional.pad(u, (reach, reach, reach, reach), value=0.0)
    new = u.clone()
    for dy, dx in offsets:
        pair_min = torch.minimum(_shifted(padded, reach, -dy, -dx, H, W),
                                 _shifted(padded, reach, dy, dx, H, W))
        new = torch.maximum(new, pair_min)
    if sources is None:
        return new
    src_padded = torch.nn.functional.pad(sources, (reach, reach, reach, reach), value=-1)
    new_sources = sources.clone()
    undecided = new > u  # risen pixels take the source of the first pair that realises the max
    for dy, dx in offsets:
        holder = _shifted(padded, reach, dy, dx, H, W)
        partner = _shifted(padded, reach, -dy, -dx, H, W)
        hit = undecided & (holder == new) & (partner >= new)
        new_sources = torch.where(hit, _shifted(src_padded, reach, dy, dx, H, W), new_sources)
        undecided = undecided & ~hit
    assert not bool(undecided.any()), "every risen pixel has a realising pair"
    return new, new_sources


def midpoint_convexify_with_sources(u: torch.Tensor, radius: float = 1.0, max_iters: int = 100,
                                    tol: float = 1e-9, track_sources: bool = True):
    """The Jacobi loop of SPEC 1.6: returns ``(out, sources, sweeps)``.

    ``u``: (B, C, H, W) float. Sweeps run while ``max|u' - u| > tol`` (max over the whole
    tensor) and fewer than ``max_iters`` sweeps have run; the sweep that meets the tolerance
    counts. ``sources``: int64 (B, C, H, W) flat input index per output pixel (-1: outside), or
    None when ``track_sources`` is False.
    """
    H, W = u.shape[-2:]
    sources = None
    if track_sources:
        sources = torch.arange(H * W, device=u.device).view(H, W).expand(u.shape).clone()
    sweeps = 0
    while sweeps < max_iters:
        if track_sources:
            new, sources = midpoint_sweep(u, radius, sources)
        else:
            new = midpoint_sweep(u, radius)
        sweeps += 1
        change = (new - u).abs().max().item()
        u = new
        if change <= tol:
            break
    return u, sources, sweeps


def gather_sources(u: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """out[q] = u[sources[q]] within each plane (0 where the source is -1); differentiable, so
    autograd of this gather is the reference backward (a scatter-add into the sources)."""
    B, C, H, W = u.shape
    flat = torch.nn.functional.pad(u.reshape(B, C, H * W), (1, 0), value=0.0)
    return torch.gather(flat, 2, (sources + 1).reshape(B, C, H * W)).view(B, C, H, W)


def midpoint_convexify(u: torch.Tensor, radius: float = 1.0, max_iters: int = 100,
                       tol: float = 1e-9, mode: str = "jacobi", return_sweeps: bool = False):
    """Reference midpoint convexification (SPEC 1.6); differentiable through the source routing.

    ``mode`` is accepted for API parity; the reference always runs the Jacobi loop (a "fast" mode
    must reach the same values at convergence).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    track = torch.is_grad_enabled() and u.requires_grad
    out, sources, sweeps = midpoint_convexify_with_sources(
        u.detach(), radius, max_iters, tol, track_sources=track)
    if track:
        out = gather_sources(u, sources)
    return (out, sweeps) if return_sweeps else out
