"""Flow Mismatching scoring, literal pure-PyTorch transcription of SPEC.md 3 (the oracle).

A straightforward loop over the T interior times and the K noise draws, with the noise passed in
explicitly (or generated here from the documented counter-based stream, in float64). Nothing
here is tuned to the fused kernels; they are tested against it.

The noise stream (also documented in csrc/include/geokernels/philox.h): element e of
eps[b, k] (flattened (C, H, W), row-major) comes from group g = e // 4, lane e % 4 of
Philox4x32-10(counter = (g mod 2^32, g >> 32, image mod 2^32, k mod 2^32),
key = (seed mod 2^32, seed >> 32)); lanes (0, 1) are Box-Muller(x0, x1) = (R cos, R sin) and
lanes (2, 3) Box-Muller(x2, x3), with u = (2 (xr >> 9) + 1) / 2^24, R = sqrt(-2 ln u),
theta = 2 pi (xa >> 8) / 2^24.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def philox4x32_10(counters, seed: int) -> np.ndarray:
    """Philox4x32-10 (Salmon et al., SC'11; Random123/curand layout) of ``counters``.

    Args:
        counters: (N, 4) integers in [0, 2^32).
        seed: the 64-bit key, key = (seed mod 2^32, seed >> 32).

    Returns:
        (N, 4) uint64 array of 32-bit outputs.
    """
    c = np.asarray(counters, dtype=np.uint64).reshape(-1, 4)
    c0, c1, c2, c3 = (c[:, i].copy() for i in range(4))
    seed = int(seed) % 2**64
    k0, k1 = seed & _MASK32, seed >> 32
    m0, m1, mask = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(_MASK32)
    for _ in range(10):
        p0 = c0 * m0  # < 2^64: exact in uint64
        p1 = c2 * m1
        hi0, lo0 = p0 >> np.uint64(32), p0 & mask
        hi1, lo1 = p1 >> np.uint64(32), p1 & mask
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=1)


def box_muller(xr: np.ndarray, xa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R cos theta, R sin theta) in float64 from two arrays of 32-bit words."""
    u = (2.0 * (xr >> np.uint64(9)).astype(np.float64) + 1.0) / 2.0**24
    radius = np.sqrt(-2.0 * np.log(u))
    theta = 2.0 * math.pi * (xa >> np.uint64(8)).astype(np.float64) / 2.0**24
    return radius * np.cos(theta), radius * np.sin(theta)


def flow_mismatch_noise(B: int, K: int, C: int, H: int, W: int, seed: int = 0,
                        image_index_offset: int = 0, dtype=torch.float64) -> torch.Tensor:
    """eps[b, k] of images image_index_offset + b from the documented stream: (B, K, C, H, W)."""
    n = C * H * W
    groups = (n + 3) // 4
    out = np.empty((B, K, groups * 4), dtype=np.float64)
    g = np.arange(groups, dtype=np.uint64)
    for b in range(B):
        for k in range(K):
            counters = np.stack([g & np.uint64(_MASK32), g >> np.uint64(32),
                                 np.full_like(g, (image_index_offset + b) & _MASK32),
                                 np.full_like(g, k & _MASK32)], axis=1)
            x = philox4x32_10(counters, seed)
            n0, n1 = box_muller(x[:, 0], x[:, 1])
            n2, n3 = box_muller(x[:, 2], x[:, 3])
            out[b, k] = np.stack([n0, n1, n2, n3], axis=1).reshape(-1)
    return torch.from_numpy(out[:, :, :n].reshape(B, K, C, H, W).copy()).to(dtype)


def agg_rank(agg: str, K: int) -> int | None:
    """1-based rank of the order statistic that ``agg`` selects among K values; None for mean."""
    if agg == "min":
        return 1
    if agg == "mean":
        return None
    if agg == "median":  # the lower median, as torch.median
        return (K - 1) // 2 + 1
    if isinstance(agg, str) and agg.startswith("quantile:"):
        alpha = Fraction(agg.split(":", 1)[1])  # exact decimal: ceil(0.3 * 10) = 3
        if not 0 < alpha <= 1:
            raise ValueError(f"agg quantile must lie in (0, 1], got {agg!r}")
        return math.ceil(alpha * K)
    raise ValueError(f"agg must be 'min', 'mean', 'median' or 'quantile:<alpha>', got {agg!r}")


def aggregate(delta: torch.Tensor, agg: str) -> torch.Tensor:
    """agg over dim 1 of (B, K, H, W) mismatches."""
    K = delta.shape[1]
    if agg == "min":
        return delta.min(dim=1).values
    if agg == "mean":
        return delta.mean(dim=1)
    if agg == "median":
        return delta.median(dim=1).values
    r = agg_rank(agg, K)
    return delta.sort(dim=1).values[:, r - 1]


def gaussian_smooth(heat: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian smoothing of (B, H, W) maps exactly like scipy.ndimage.gaussian_filter
    (mode="reflect": d c b a | a b c d | d c b a, radius int(truncate * sigma + 0.5), weights
    exp(-x^2 / 2 sigma^2) normalised), rows first, then columns. sigma = 0 returns the input."""
    if sigma == 0:
        return heat
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(heat.dtype)

    def reflect(i, n):
        m = i % (2 * n)
        return m if m < n else 2 * n - 1 - m

    out = heat
    for dim in (1, 2):
        n = out.shape[dim]
        acc = torch.zeros_like(out)
        for w, o in zip(weights, range(-radius, radius + 1)):
            idx = torch.tensor([reflect(i + o, n) for i in range(n)], device=heat.device)
            acc = acc + w * out.index_select(dim, idx)
        out = acc
    return out


def flow_mismatch(model, x: torch.Tensor, K: int = 8, T: int = 24, agg: str = "min",
                  r: float = 2.0, seed: int = 0, cond=None, noise: torch.Tensor | None = None,
                  smooth_sigma: float = 0.0, image_index_offset: int = 0) -> torch.Tensor:
    """H(p) = (1/T) sum_j t_j^r agg_k sum_c (v(x_t, t_j) - (x - eps_k))^2, t_j = j/(T+1).

    Args:
        model: velocity field, called as model(x_t (B, C, H, W), t (B,), cond).
        x: (B, C, H, W) test images.
        noise: (B, K, C, H, W) explicit eps; None draws it from the documented Philox stream
            (float64 Box-Muller here, so it matches the kernels' float32 noise to rounding).
        cond: passed to the model unchanged (one entry per image).

    Returns:
        (B, H, W) heatmaps, dtype of x.
    """
    B, C, H, W = x.shape
    if noise is None:
        noise = flow_mismatch_noise(B, K, C, H, W, seed, image_index_offset).to(x.device)
    noise = noise.to(x.dtype)
    heat = torch.zeros(B, H, W, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for j in range(1, T + 1):
            t = j / (T + 1)
            deltas = []
            for k in range(K):
                eps = noise[:, k]
                x_t = (1 - t) * eps + t * x
                v = model(x_t, torch.full((B,), t, dtype=x.dtype, device=x.device), cond)
                deltas.append(((v - (x - eps)) ** 2).sum(dim=1))
            heat = heat + t ** r * aggregate(torch.stack(deltas, dim=1), agg)
        heat = heat / T
    return gaussian_smooth(heat, smooth_sigma)


def anomaly_score(heatmap: torch.Tensor, mode: str = "max+topk", topk: float = 0.01) -> torch.Tensor:
    """Image scores (B,) of (B, H, W) maps: max_p H + mean of the top ceil(topk*HW) values
    ("max+topk"), or only the max ("max"), or only the top-k mean ("topk_mean")."""
    flat = heatmap.flatten(1)
    k = math.ceil(Fraction(str(float(topk))) * flat.shape[1])
    top = flat.sort(dim=1, descending=True).values[:, :k].mean(dim=1)
    mx = flat.max(dim=1).values
    return {"max+topk": mx + top, "max": mx, "topk_mean": top}[mode]
