"""Pure-PyTorch oracle of the exact distance transform and the contour-flow field (SPEC.md 2.1-2.2).

Two transcriptions of the Euclidean distance transform, both exact (integer squared distances,
one square root in float64, one rounding to the output dtype):

* :func:`distance_transform_bruteforce` - the definition itself: for every pixel, the minimum over
  ALL target pixels of (i - k)^2 + (j - l)^2. O((HW)^2); the oracle for small images.
* :func:`distance_transform` - the same minimum taken separably, first along columns and then
  along rows (min over (k, l) of (i-k)^2 + (j-l)^2 = min_l [(j-l)^2 + min_k (i-k)^2]), as dense
  min-plus products. O(HW(H+W)); tests check it equals the brute force. It is the reference the
  field and the benchmarks use.

Conventions shared with the kernels (geokernels.ops.distance):

* mask: (B, C, H, W), any real dtype or bool; nonzero = foreground. Every (b, c) plane is a
  separate image. The distance is measured to the nearest ZERO pixel (``invert=True``: to the
  nearest NONZERO pixel, i.e. EDT(1 - mask) for a binary mask); those pixels get 0.
* A plane without a single target pixel has no defined distance: ``no_background="inf"``
  (default) gives +inf everywhere; ``"scipy"`` reproduces scipy.ndimage.distance_transform_edt,
  which behaves as if the pixel (-1, 0) above the top-left corner were background:
  sqrt((i + 1)^2 + j^2).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from geokernels.reference.contour_flow import grad_forward

NO_BACKGROUND = ("inf", "scipy")
STENCILS = ("forward", "central")
_CHUNK = 1 << 22  # elements per int64 temporary (32 MiB)


def sqrt_ieee(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root (IEEE 754), in t's dtype.

    torch's CPU sqrt is a vectorised approximation within 1 ulp (not correctly rounded, for
    float32 and float64 alike), while scipy, numpy, C's sqrt and CUDA's sqrt are IEEE: the oracle
    must be IEEE too, so on CPU it takes numpy's. Under a tracer (torch.compile / export, fake
    or functorch tensors), which cannot see numpy, it is torch's sqrt (within 1 ulp).
    """
    from geokernels._checks import tracing

    if t.device.type == "cpu" and not tracing(t):
        return torch.from_numpy(np.sqrt(t.detach().contiguous().numpy()))
    return torch.sqrt(t)


def _targets(mask: torch.Tensor, invert: bool) -> torch.Tensor:
    nonzero = mask != 0
    return nonzero if invert else ~nonzero


def _no_background_plane(H: int, W: int, mode: str, dtype, device) -> torch.Tensor:
    if mode == "inf":
        return torch.full((H, W), math.inf, dtype=dtype, device=device)
    i = torch.arange(H, dtype=torch.int64, device=device).view(H, 1)
    j = torch.arange(W, dtype=torch.int64, device=device).view(1, W)
    return sqrt_ieee(((i + 1) ** 2 + j ** 2).to(torch.float64)).to(dtype)


def _check(mask: torch.Tensor, no_background: str) -> None:
    if mask.dim() != 4:
        raise ValueError(f"mask must have shape (B, C, H, W), got shape {tuple(mask.shape)}")
    if no_background not in NO_BACKGROUND:
        raise ValueError(f"no_background must be one of {NO_BACKGROUND}, got {no_background!r}")


def distance_transform_bruteforce(mask: torch.Tensor, invert: bool = False,
                                  dtype: torch.dtype = torch.float32,
                                  no_background: str = "inf") -> torch.Tensor:
    """The definition: d(p) = min over target pixels q of |p - q| (all pairs). Small images only."""
    _check(mask, no_background)
    B, C, H, W = mask.shape
    target = _targets(mask, invert).reshape(B * C, H * W)
    ii, jj = torch.meshgrid(torch.arange(H, device=mask.device), torch.arange(W, device=mask.device),
                            indexing="ij")
    coords = torch.stack([ii.reshape(-1), jj.reshape(-1)], dim=1)  # (HW, 2) int64
    out = torch.empty(B * C, H * W, dtype=dtype, device=mask.device)
    for p in range(B * C):
        tq = coords[target[p]]  # (n, 2)
        if tq.shape[0] == 0:
            out[p] = _no_background_plane(H, W, no_background, dtype, mask.device).reshape(-1)
            continue
        best = torch.empty(H * W, dtype=torch.int64, device=mask.device)
        step = max(1, _CHUNK // tq.shape[0])
        for s in range(0, H * W, step):
            diff = coords[s:s + step, None, :] - tq[None, :, :]  # (step, n, 2)
            best[s:s + step] = (diff * diff).sum(-1).min(dim=1).values
        out[p] = sqrt_ieee(best.to(torch.float64)).to(dtype)
    return out.reshape(B, C, H, W)


def distance_transform(mask: torch.Tensor, invert: bool = False, dtype: torch.dtype = torch.float32,
                       no_background: str = "inf") -> torch.Tensor:
    """Exact EDT by the separable min-plus form (columns, then rows); equals the brute force."""
    _check(mask, no_background)
    B, C, H, W = mask.shape
    dev = mask.device
    target = _targets(mask, invert).reshape(B * C, H, W)
    big = (H + W) ** 2  # larger than any squared distance inside the image
    rows = torch.arange(H, device=dev)
    cols = torch.arange(W, device=dev)
    out = torch.empty(B * C, H, W, dtype=dtype, device=dev)
    for p in range(B * C):
        t = target[p]
        if not bool(t.any()):
            out[p] = _no_background_plane(H, W, no_background, dtype, dev)
            continue
        # g2[i, j] = min_k over targets in column j of (i - k)^2   (big where the column has none)
        col_cost = torch.where(t, 0, big).to(torch.int64)  # (H, W): 0 at targets
        g2 = torch.empty(H, W, dtype=torch.int64, device=dev)
        step = max(1, _CHUNK // (H * W))
        for s in range(0, H, step):
            di2 = (rows[s:s + step, None] - rows[None, :]) ** 2  # (step, H): (i - k)^2
            g2[s:s + step] = (di2[:, :, None] + col_cost[None, :, :]).min(dim=1).values
        # d2[i, j] = min_l (j - l)^2 + g2[i, l]
        dj2 = (cols[:, None] - cols[None, :]) ** 2  # (W, W): (j - l)^2
        d2 = torch.empty(H, W, dtype=torch.int64, device=dev)
        step = max(1, _CHUNK // (W * W))
        for s in range(0, H, step):
            d2[s:s + step] = (dj2[None, :, :] + g2[s:s + step, None, :]).min(dim=2).values
        out[p] = sqrt_ieee(d2.to(torch.float64)).to(dtype)
    return out.reshape(B, C, H, W)


def _stencil(f: torch.Tensor, stencil: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) differences with the "valid" border of SPEC 2.1 (border pixels get 0)."""
    if stencil == "forward":
        return grad_forward(f, "valid")
    if stencil == "central":  # ablation: (f[i+1] - f[i-1]) / 2, same "valid" border
        H, W = f.shape[-2:]
        d0 = torch.zeros_like(f)
        d1 = torch.zeros_like(f)
        if H >= 3 and W >= 3:
            d0[..., 1:-1, 1:-1] = (f[..., 2:, 1:-1] - f[..., :-2, 1:-1]) / 2
            d1[..., 1:-1, 1:-1] = (f[..., 1:-1, 2:] - f[..., 1:-1, :-2]) / 2
        return d0, d1
    raise ValueError(f"stencil must be one of {STENCILS}, got {stencil!r}")


def gaussian_smooth(f: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of the last two dims, as scipy.ndimage.gaussian_filter(mode="nearest",
    truncate=4.0): radius int(4 sigma + 0.5), weights exp(-x^2 / (2 sigma^2)) normalised to sum 1,
    replicated borders."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=f.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(f.dtype)
    shape = f.shape
    g = f.reshape(-1, 1, shape[-2], shape[-1])
    g = F.conv2d(F.pad(g, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    g = F.conv2d(F.pad(g, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return g.reshape(shape)


def flow_from_gradient(g0: torch.Tensor, g1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 2.2: N = G / max(|G|, 1e-20); F = (-N1, N0)."""
    norm = sqrt_ieee(g0 * g0 + g1 * g1)
    den = torch.clamp(norm, min=1e-20)
    return -(g1 / den), g0 / den


def contour_flow_field(mask: torch.Tensor, stencil: str = "forward", smooth_sigma: float = 0.0,
                       dtype: torch.dtype = torch.float32, edt=None) -> torch.Tensor:
    """SPEC 2.2, literally: (B, C, H, W) binary mask -> (B, 2C, H, W) unit tangent field.

    Channels 2c and 2c+1 of the result are F = (F0, F1) of mask channel c (F0 pairs with the row
    difference, F1 with the column difference). With the defaults::

        d_in = EDT(m);  d_out = EDT(1 - m)
        G = grad_valid(d_in) * m + grad_valid(-d_out) * (1 - m)
        N = G / max(|G|, 1e-20);  F = (-N1, N0)

    Ablations: ``stencil="central"`` uses (f[i+1] - f[i-1]) / 2; ``smooth_sigma > 0`` replaces
    the piecewise G by the gradient of the Gaussian-smoothed signed distance
    ``gaussian_smooth(d_in - d_out, smooth_sigma)`` (both stencils, "valid" border).
    A constant plane (all foreground or all background) has no contour: its field is 0.
    ``edt(mask, invert, dtype)`` computes the distances (default: the separable reference).
    """
    if edt is None:
        edt = lambda m, invert, dt: distance_transform(m, invert=invert, dtype=dt)  # noqa: E731
    m = (mask != 0).to(dtype)
    d_in = edt(mask, False, dtype)
    d_out = edt(mask, True, dtype)
    if smooth_sigma > 0:
        sd = gaussian_smooth(d_in - d_out, smooth_sigma)
        g0, g1 = _stencil(sd, stencil)
    else:
        a0, a1 = _stencil(d_in, stencil)
        b0, b1 = _stencil(-d_out, stencil)
        g0 = a0 * m + b0 * (1 - m)
        g1 = a1 * m + b1 * (1 - m)
    f0, f1 = flow_from_gradient(g0, g1)
    flat = m.flatten(2)
    constant = (flat.amin(dim=2) == flat.amax(dim=2))[..., None, None]  # (B, C, 1, 1)
    f0 = torch.where(constant, torch.zeros_like(f0), f0)
    f1 = torch.where(constant, torch.zeros_like(f1), f1)
    B, C, H, W = mask.shape
    return torch.stack([f0, f1], dim=2).reshape(B, 2 * C, H, W)
