"""TEMPORARY pure-PyTorch/NumPy stand-ins for pieces built on parallel branches (issue 5).

Used ONLY when the real ones cannot be imported:
* ``geokernels.ops.flow_mismatch`` / ``anomaly_score`` (fused mismatch reduction, SPEC 3),
* ``geokernels.metrics.auroc / average_precision / aupro``,
* ``geokernels.data.MVTecAD`` (official folder layout).
``resolve()`` returns the real implementations whenever they exist. Delete this module once the
mismatch/metrics/data branches are on main (the lead's merge note names it).
"""
from __future__ import annotations

import glob
import hashlib
import math
import os

import numpy as np
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


# ---------------------------------------------------------------- metrics (exact, numpy)
def _np(a):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def auroc(scores, labels) -> float:
    from scipy.stats import rankdata

    s, y = _np(scores).ravel().astype(np.float64), _np(labels).ravel() > 0
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, labels) -> float:
    s, y = _np(scores).ravel().astype(np.float64), (_np(labels).ravel() > 0).astype(np.float64)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupro(heatmaps, masks, fpr_limit=0.3) -> float:
    """PRO integrated over FPR in [0, fpr_limit] / fpr_limit; every distinct score a threshold."""
    from scipy import ndimage

    h = _np(heatmaps).astype(np.float64)
    m = _np(masks) > 0
    h = h.reshape(-1, h.shape[-2], h.shape[-1])
    m = m.reshape(-1, m.shape[-2], m.shape[-1])
    weights = np.zeros(h.shape, dtype=np.float64)
    n_regions = 0
    sizes = []
    labelled = []
    for i in range(len(m)):
        lab, n = ndimage.label(m[i], structure=np.ones((3, 3)))
        labelled.append((lab, n_regions))
        for r_ in range(1, n + 1):
            sizes.append(int((lab == r_).sum()))
        n_regions += n
    if n_regions == 0 or (~m).sum() == 0:
        return float("nan")
    sizes = np.asarray(sizes, dtype=np.float64)
    for i, (lab, offset) in enumerate(labelled):
        fg = lab > 0
        weights[i][fg] = 1.0 / (n_regions * sizes[lab[fg] - 1 + offset])
    s = h.ravel()
    w = weights.ravel()
    neg = (~m).ravel().astype(np.float64) / (~m).sum()
    order = np.argsort(-s, kind="mergesort")
    s, w, neg = s[order], w[order], neg[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    pro = np.r_[0.0, np.cumsum(w)[last]]
    fpr = np.r_[0.0, np.cumsum(neg)[last]]
    keep = fpr <= fpr_limit
    fx, fy = fpr[keep], pro[keep]
    if fx[-1] < fpr_limit:
        i = np.searchsorted(fpr, fpr_limit)
        if i < len(fpr):
            y_at = pro[i - 1] + (pro[i] - pro[i - 1]) * (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
            fx, fy = np.r_[fx, fpr_limit], np.r_[fy, y_at]
    return float(np.trapezoid(fy, fx) / fpr_limit) if hasattr(np, "trapezoid") else \
        float(np.trapz(fy, fx) / fpr_limit)


# ---------------------------------------------------------------- MVTec-AD folder layout
class MVTecAD(torch.utils.data.Dataset):
    """Minimal MVTec-AD reader: train/good, test/<defect>, ground_truth/<defect>/*_mask.png."""

    _EXT = (".png", ".jpg", ".jpeg", ".bmp")

    def __init__(self, root, category, split="train", size=256):
        folder = os.path.join(os.fspath(root), category, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"MVTec-AD folder {folder!r} does not exist (root={root!r}, "
                                    f"category={category!r}, split={split!r})")
        self.root, self.category, self.split, self.size = os.fspath(root), category, split, int(size)
        self.items = []
        for defect in sorted(os.listdir(folder)):
            for p in sorted(glob.glob(os.path.join(folder, defect, "*"))):
                if p.lower().endswith(self._EXT):
                    self.items.append((p, defect))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, defect = self.items[i]
        img = Image.open(path).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        label = 0 if defect == "good" else 1
        mask = torch.zeros(1, self.size, self.size)
        if label:
            stem = os.path.splitext(os.path.basename(path))[0]
            mp = os.path.join(self.root, self.category, "ground_truth", defect, stem + "_mask.png")
            if os.path.exists(mp):
                mimg = Image.open(mp).convert("L").resize((self.size, self.size), Image.NEAREST)
                mask = torch.from_numpy((np.asarray(mimg) > 127).astype(np.float32))[None]
        return {"image": image.contiguous(), "mask": mask, "label": label, "path": path,
                "defect": defect}
