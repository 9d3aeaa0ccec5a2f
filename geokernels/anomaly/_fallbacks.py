"""TEMPORARY pure-PyTorch stand-in for ``geokernels.ops.flow_mismatch`` / ``anomaly_score``
(SPEC 3), built on a parallel branch (issue 5).

Used ONLY when the real op cannot be imported (``geokernels.anomaly._compat``). Delete this module
and the fallback branches in ``_compat`` once the mismatch branch is on main.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch.nn import functional as F

AGGREGATIONS = ("min", "mean", "median")


def _seed_of(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _aggregate(delta: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce (B, K, H, W) over K as SPEC 3 defines agg."""
    if agg == "min":
        return delta.min(dim=1).values
    if agg == "mean":
        return delta.mean(dim=1)
    if agg == "median":
        return delta.median(dim=1).values
    if agg.startswith("quantile:"):
        alpha = float(agg.split(":", 1)[1])
        k = max(1, math.ceil(alpha * delta.shape[1]))
        return delta.sort(dim=1).values[:, k - 1]
    raise ValueError(f"agg must be one of {AGGREGATIONS} or 'quantile:alpha', got {agg!r}")


def _gaussian_smooth(h: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=h.dtype, device=h.device)
    k = torch.exp(-xs ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = h[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


@torch.no_grad()
def flow_mismatch(model, x, K=8, T=24, agg="min", r=2.0, seed=0, cond=None, noise=None,
                  chunk=None, smooth_sigma=0.0, image_index_offset=0, backend="auto"):
    """Literal SPEC 3 mismatch heatmap (B, H, W), K paths batched through ``model``."""
    B, C, H, W = x.shape
    if noise is None:
        noise = torch.empty(B, K, C, H, W, dtype=x.dtype)
        for b in range(B):
            for k in range(K):
                g = torch.Generator().manual_seed(_seed_of(seed, image_index_offset + b, k))
                noise[b, k] = torch.randn(C, H, W, generator=g, dtype=x.dtype)
        noise = noise.to(x.device)
    xk = x[:, None].expand(B, K, C, H, W)
    target = (xk - noise).reshape(B * K, C, H, W)
    heat = torch.zeros(B, H, W, dtype=x.dtype, device=x.device)
    cond_n = None if cond is None else cond.repeat_interleave(K)
    for j in range(1, T + 1):
        t = j / (T + 1)
        x_t = ((1 - t) * noise + t * xk).reshape(B * K, C, H, W)
        tt = torch.full((B * K,), t, dtype=x.dtype, device=x.device)
        v = model(x_t, tt, cond_n).to(x.dtype)
        delta = ((v - target) ** 2).sum(dim=1).reshape(B, K, H, W)
        heat += (t ** r) * _aggregate(delta, agg)
    heat /= T
    if smooth_sigma and smooth_sigma > 0:
        heat = _gaussian_smooth(heat, smooth_sigma)
    return heat


def anomaly_score(heatmap, mode="max+topk", topk=0.01):
    """(B, H, W) -> (B,): "max", "topk_mean" or "max+topk" (SPEC 3)."""
    flat = heatmap.reshape(heatmap.shape[0], -1)
    n = max(1, math.ceil(topk * flat.shape[1]))
    top = flat.topk(n, dim=1).values.mean(dim=1)
    mx = flat.max(dim=1).values
    if mode == "max":
        return mx
    if mode == "topk_mean":
        return top
    if mode == "max+topk":
        return mx + top
    raise ValueError(f"mode must be one of ('max', 'topk_mean', 'max+topk'), got {mode!r}")
