"""Segmentation metrics: Dice, IoU, HD95, boundary distance BD/BDSD (SPEC.md 2.6) and solidity.

Inputs are binary masks of shape (..., H, W): every index of the leading dims is one image
(e.g. (B, 1, H, W) or (B, H, W) or (H, W)); bool, or 0/1 values of any real dtype (torch tensors
or numpy arrays). A metric is computed per image and then averaged over the images
(``reduction="mean"``, a 0-dim float64 tensor) or returned per image (``reduction="none"``, a
float64 tensor of the leading shape).

Empty masks never produce a silent NaN:

* dice / iou: both masks empty -> 1.0 (perfect agreement); otherwise the usual ratio (0 when
  exactly one is empty).
* hd95 / boundary_distance: both masks without boundary pixels -> 0.0; exactly one -> the value
  ``empty_distance`` (default +inf, so a mean over such images is +inf, not NaN; pass e.g. the
  image diagonal for a finite penalty, or take ``reduction="none"`` and filter).
* solidity: an empty mask -> 1.0 (the empty set is convex).

Distances use the exact Euclidean distance transform of :mod:`geokernels.ops.distance`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from geokernels.ops.distance import distance_transform

REDUCTIONS = ("mean", "none")


# ---- input handling ---------------------------------------------------------------------------

def _as_mask(x, name: str) -> torch.Tensor:
    """(..., H, W) binary -> bool tensor of shape (N, H, W) (N = product of leading dims)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must be a real or bool mask, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    x = x.detach()
    if x.dtype != torch.bool:
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(
                f"{name} must be a binary mask (0/1 or bool); threshold it first, e.g. {name} > 0.5")
        x = x != 0
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _pair(pred, gt) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    p = _as_mask(pred, "pred")
    g = _as_mask(gt, "gt")
    pshape = tuple(pred.shape)
    if pshape != tuple(gt.shape):
        raise ValueError(f"pred and gt must have the same shape, got {pshape} and {tuple(gt.shape)}")
    if p.device != g.device:
        g = g.to(p.device)
    return p, g, pshape[:-2]


def _reduce(values: torch.Tensor, lead: tuple, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    values = values.to(torch.float64)
    if reduction == "none":
        return values.reshape(lead)
    return values.mean()


def _check_empty_distance(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"empty_distance must be a real number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v) or v < 0:
        raise ValueError(f"empty_distance must be >= 0 (inf allowed), got {v!r}")
    return v


# ---- overlap metrics --------------------------------------------------------------------------

def dice(pred, gt, reduction: str = "mean") -> torch.Tensor:
    """Dice 2|P & G| / (|P| + |G|) per image; 1.0 when both masks are empty."""
    p, g, lead = _pair(pred, gt)
    inter = (p & g).flatten(1).sum(1).to(torch.float64)
    total = (p.flatten(1).sum(1) + g.flatten(1).sum(1)).to(torch.float64)
    values = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return _reduce(values, lead, reduction)


def iou(pred, gt, reduction: str = "mean") -> torch.Tensor:
    """Intersection over union |P & G| / |P | G| per image; 1.0 when both masks are empty."""
    p, g, lead = _pair(pred, gt)
    inter = (p & g).flatten(1).sum(1).to(torch.float64)
    union = (p | g).flatten(1).sum(1).to(torch.float64)
    values = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return _reduce(values, lead, reduction)


# ---- boundaries -------------------------------------------------------------------------------

def inner_boundary(mask) -> torch.Tensor:
    """Foreground pixels with a 4-neighbour in the background: skimage
    ``find_boundaries(mask, mode="inner")`` (connectivity 1; the image edge is reflected, so a
    pixel is never a boundary pixel just for touching the edge). (..., H, W) -> bool, same shape."""
    m = _as_mask(mask, "mask")
    return _inner_boundary(m).reshape(mask.shape)


def _inner_boundary(m: torch.Tensor) -> torch.Tensor:
    # neighbours with the edge replicated (= skimage's reflect mode for a 3x3 footprint)
    up = torch.cat([m[:, :1], m[:, :-1]], 1)
    down = torch.cat([m[:, 1:], m[:, -1:]], 1)
    left = torch.cat([m[:, :, :1], m[:, :, :-1]], 2)
    right = torch.cat([m[:, :, 1:], m[:, :, -1:]], 2)
    return m & ~(up & down & left & right)


def _surface(m: torch.Tensor) -> torch.Tensor:
    """medpy's surface: m XOR binary_erosion(m, cross, border_value=0) (the image edge counts as
    background, so foreground pixels on the edge are surface pixels)."""
    x = F.pad(m.to(torch.uint8)[:, None], (1, 1, 1, 1), value=0)[:, 0]
    eroded = ((x[:, :-2, 1:-1] == 1) & (x[:, 2:, 1:-1] == 1) & (x[:, 1:-1, :-2] == 1)
              & (x[:, 1:-1, 2:] == 1))
    return m & ~eroded


def _edt(m: torch.Tensor, invert: bool) -> torch.Tensor:
    return distance_transform(m[:, None], invert=invert, dtype=torch.float64)[:, 0]


def hd95(pred, gt, reduction: str = "mean", empty_distance: float = math.inf) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance per image, medpy ``hd95`` semantics.

    Surfaces are ``m XOR erosion(m)`` (4-connected cross, the image edge counted as background);
    the distances from each surface pixel of one mask to the nearest surface pixel of the other,
    in both directions, are pooled, and their 95th percentile (linear interpolation, as
    numpy.percentile) is the value. Both masks empty -> 0; exactly one empty -> ``empty_distance``.
    """
    empty_distance = _check_empty_distance(empty_distance)
    p, g, lead = _pair(pred, gt)
    sp, sg = _surface(p), _surface(g)
    to_gt = _edt(sg, invert=True)  # distance to the nearest gt surface pixel
    to_pred = _edt(sp, invert=True)
    values = torch.empty(p.shape[0], dtype=torch.float64)
    for n in range(p.shape[0]):
        has_p, has_g = bool(sp[n].any()), bool(sg[n].any())
        if not (has_p and has_g):
            values[n] = 0.0 if not (has_p or has_g) else empty_distance
            continue
        d = torch.cat([to_gt[n][sp[n]], to_pred[n][sg[n]]])
        values[n] = torch.quantile(d, 0.95).item()
    return _reduce(values, lead, reduction)


def boundary_distance(pred, gt, reduction: str = "mean", empty_distance: float = math.inf
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary distance and its spread (BD, BDSD) per image (SPEC.md 2.6)::

        df = EDT(gt) + EDT(1 - gt), set to 0 on the inner boundary of gt
        B  = inner-boundary pixels of pred (skimage find_boundaries(mode="inner"))
        BD = mean(df[B]);  BDSD = std(df[B])   (population std, ddof = 0, as numpy.std)

    Images where neither mask has a boundary pixel give (0, 0); where exactly one has none
    (empty or full mask) both values are ``empty_distance``.
    """
    empty_distance = _check_empty_distance(empty_distance)
    p, g, lead = _pair(pred, gt)
    bg_gt = _inner_boundary(g)
    bp = _inner_boundary(p)
    df = _edt(g, invert=False) + _edt(g, invert=True)
    df = torch.where(bg_gt, torch.zeros_like(df), df)
    bd = torch.empty(p.shape[0], dtype=torch.float64)
    bdsd = torch.empty(p.shape[0], dtype=torch.float64)
    for n in range(p.shape[0]):
        has_p, has_g = bool(bp[n].any()), bool(bg_gt[n].any())
        if not (has_p and has_g):
            v = 0.0 if not (has_p or has_g) else empty_distance
            bd[n] = v
            bdsd[n] = v
            continue
        vals = df[n][bp[n]]
        bd[n] = vals.mean().item()
        bdsd[n] = vals.std(unbiased=False).item()
    return _reduce(bd, lead, reduction), _reduce(bdsd, lead, reduction)


# ---- convexity ----------------------------------------------------------------------------------

def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (counter-clockwise, no collinear vertices) of integer points (n, 2), exact
    (Andrew's monotone chain with int64 cross products)."""
    pts = np.unique(points, axis=0)  # sorted by x then y
    if len(pts) <= 2:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for q in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], q) <= 0:
            lower.pop()
        lower.append(q)
    upper: list = []
    for q in pts[::-1]:
        while len(upper) >= 2 and cross(upper[-2], upper[-1], q) <= 0:
            upper.pop()
        upper.append(q)
    return np.array(lower[:-1] + upper[:-1], dtype=np.int64)


def _convex_area(m: np.ndarray) -> int:
    """Pixels whose centre lies inside or on the convex hull of the foreground pixels' edge
    midpoints: skimage ``convex_hull_image(m).sum()`` (the denominator of regionprops'
    solidity). Coordinates are doubled so every vertex is an integer point."""
    rows, cols = np.nonzero(m)
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    # the extremes of every row and every column span the same hull as all pixels
    first = np.r_[True, rows[1:] != rows[:-1]]
    last = np.r_[rows[1:] != rows[:-1], True]
    keep = first | last
    order_c = np.lexsort((rows, cols))
    rc, cc = rows[order_c], cols[order_c]
    first_c = np.r_[True, cc[1:] != cc[:-1]]
    last_c = np.r_[cc[1:] != cc[:-1], True]
    cand = np.concatenate([np.stack([rows[keep], cols[keep]], 1),
                           np.stack([rc[first_c | last_c], cc[first_c | last_c]], 1)])
    diamond = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)
    pts = (2 * cand.astype(np.int64))[:, None, :] + diamond[None]
    hull = _hull(pts.reshape(-1, 2))  # (k, 2) of (2r, 2c), counter-clockwise in (r, c)
    r0, r1 = rows.min(), rows.max()
    c0, c1 = cols.min(), cols.max()
    gr, gc = np.meshgrid(2 * np.arange(r0 - 1, r1 + 2, dtype=np.int64),
                         2 * np.arange(c0 - 1, c1 + 2, dtype=np.int64), indexing="ij")
    inside = np.ones(gr.shape, dtype=bool)
    nxt = np.roll(hull, -1, axis=0)
    for (ar, ac), (br, bc) in zip(hull, nxt):
        inside &= (br - ar) * (gc - ac) - (bc - ac) * (gr - ar) >= 0
    return int(inside.sum())


def solidity(mask, reduction: str = "mean") -> torch.Tensor:
    """Area / convex-hull area per image, as skimage ``regionprops(mask).solidity`` (all
    foreground pixels form one region; the hull is skimage's ``convex_hull_image``). 1.0 for a
    convex digital shape, lower for concave ones; an empty mask gives 1.0."""
    m = _as_mask(mask, "mask")
    lead = tuple(mask.shape)[:-2]
    values = torch.empty(m.shape[0], dtype=torch.float64)
    arr = m.cpu().numpy()
    for n in range(m.shape[0]):
        area = int(arr[n].sum())
        values[n] = 1.0 if area == 0 else area / _convex_area(arr[n])
    return _reduce(values, lead, reduction)
