"""Synthetic segmentation set: one convex or near-convex object per image, exact masks.

Each item is rendered on the fly from ``(seed, index)`` alone, so the set needs no files, is
identical on every machine and run, and supports random access. Shapes:

* ``"ellipse"``: rotated ellipse;
* ``"rounded_polygon"``: convex polygon (3-7 vertices) dilated by a disk (rounded corners);
* ``"blob"``: cell-like star-shaped blob r(theta) = R (1 + sum_k a_k cos(k theta + phi_k)),
  k = 2..4, small a_k: near-convex.

The mask is the exact indicator of the shape at pixel centres. The image shows the object on a
shaded background, degraded by (all optional) occluders painted over the object (the mask still
holds the whole object: what a shape prior must recover), clutter (small distractor shapes that
are not in the mask), Gaussian noise and salt-and-pepper noise. Shape, occluders and clutter come
from one random stream and noise from another, so the same index at another noise level shows
the same scene (robustness studies).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from scipy import ndimage

KINDS = ("ellipse", "rounded_polygon", "blob")


def _check_range(value, name: str, lo: float, hi: float | None = None) -> tuple[float, float]:
    if isinstance(value, Real) and not isinstance(value, bool):
        value = (float(value), float(value))
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be a number or a (min, max) pair, got {value!r}")
    a, b = float(value[0]), float(value[1])
    if not (math.isfinite(a) and math.isfinite(b)) or a > b or a < lo or (hi is not None and b > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must satisfy min <= max within {bound}, got {value!r}")
    return a, b


class SyntheticShapes(torch.utils.data.Dataset):
    """Deterministic synthetic segmentation dataset (torch Dataset).

    Args:
        length: number of items.
        size: image size, int or (H, W) (each >= 16).
        seed: the set's seed; item ``index`` depends on (seed, index) only.
        kinds: shape kinds to draw from, uniformly (subset of ``KINDS``).
        radius: object radius as a fraction of min(H, W), (min, max) or a number.
        noise_std: standard deviation of additive Gaussian noise (number or (min, max)).
        salt_pepper: fraction of pixels set to 0 or 1 (number or (min, max)).
        occlusion_prob: probability that 1-2 occluders are painted over the object.
        clutter: maximum number of distractor shapes per image (drawn uniformly in 0..clutter).
        contrast: |object - background| intensity difference (number or (min, max)).

    Returns per item ``(image, mask)``: image float32 (1, H, W) in [0, 1], mask float32
    (1, H, W) of exact 0/1 values. :meth:`render` also returns the clean image and the kind.
    """

    def __init__(self, length: int = 1000, size=128, seed: int = 0, kinds=KINDS,
                 radius=(0.18, 0.32), noise_std=0.08, salt_pepper=0.0, occlusion_prob=0.3,
                 clutter: int = 3, contrast=(0.25, 0.6)):
        if isinstance(length, bool) or not isinstance(length, Integral) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if isinstance(size, Integral) and not isinstance(size, bool):
            size = (int(size), int(size))
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, Integral) and not isinstance(s, bool) for s in size)):
            raise TypeError(f"size must be an int or an (H, W) pair of ints, got {size!r}")
        if min(size) < 16:
            raise ValueError(f"size must be at least 16 x 16, got {tuple(size)}")
        if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        kinds = tuple(kinds) if not isinstance(kinds, str) else (kinds,)
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        if isinstance(clutter, bool) or not isinstance(clutter, Integral) or clutter < 0:
            raise ValueError(f"clutter must be a non-negative int, got {clutter!r}")
        if (isinstance(occlusion_prob, bool) or not isinstance(occlusion_prob, Real)
                or not 0.0 <= float(occlusion_prob) <= 1.0):
            raise ValueError(f"occlusion_prob must be in [0, 1], got {occlusion_prob!r}")
        self.length = int(length)
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.kinds = kinds
        self.radius = _check_range(radius, "radius", 0.02, 0.45)
        self.noise_std = _check_range(noise_std, "noise_std", 0.0)
        self.salt_pepper = _check_range(salt_pepper, "salt_pepper", 0.0, 1.0)
        self.occlusion_prob = float(occlusion_prob)
        self.clutter = int(clutter)
        self.contrast = _check_range(contrast, "contrast", 0.0, 1.0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        item = self.render(index)
        return item["image"], item["mask"]

    # ---- rendering --------------------------------------------------------------------------
    def render(self, index: int) -> dict:
        """``{"image", "mask", "clean", "kind"}`` of item ``index`` (clean = before noise)."""
        if isinstance(index, bool) or not isinstance(index, Integral):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a set of {self.length} items")
        H, W = self.size
        rng = np.random.default_rng([self.seed, int(index), 0])      # scene
        noise_rng = np.random.default_rng([self.seed, int(index), 1])  # noise only
        yy, xx = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64),
                             indexing="ij")
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        r = rng.uniform(*self.radius) * min(H, W)
        margin = 1.15 * r + 1.0
        cy = rng.uniform(margin, H - 1 - margin) if H - 1 > 2 * margin else (H - 1) / 2
        cx = rng.uniform(margin, W - 1 - margin) if W - 1 > 2 * margin else (W - 1) / 2
        mask = _SHAPES[kind](rng, yy - cy, xx - cx, r)

        bg = rng.uniform(0.15, 0.45)
        contrast = rng.uniform(*self.contrast) * (1 if rng.random() < 0.7 else -1)
        fg = float(np.clip(bg + contrast, 0.0, 1.0))
        # shaded background (a linear illumination ramp) and a faint object texture
        ang = rng.uniform(0, 2 * np.pi)
        ramp = 0.08 * ((yy / H - 0.5) * np.cos(ang) + (xx / W - 0.5) * np.sin(ang))
        texture = 0.03 * ndimage.gaussian_filter(rng.standard_normal((H, W)), 2.0) * 4
        obj = ndimage.gaussian_filter(mask.astype(np.float64), 0.7)  # soft edge in the image only
        image = bg + ramp + (fg - bg) * obj + texture * mask

        for _ in range(int(rng.integers(0, self.clutter + 1))):
            cm = _clutter_shape(rng, yy, xx, H, W, r)
            image = np.where(cm, rng.uniform(0.0, 1.0), image)
        if rng.random() < self.occlusion_prob:
            for _ in range(int(rng.integers(1, 3))):
                om = _occluder(rng, yy - cy, xx - cx, r)
                image = np.where(om, bg + ramp + rng.uniform(-0.05, 0.05), image)
        clean = np.clip(image, 0.0, 1.0)

        std = noise_rng.uniform(*self.noise_std)
        noisy = clean + std * noise_rng.standard_normal((H, W))
        frac = noise_rng.uniform(*self.salt_pepper)
        if frac > 0:
            hit = noise_rng.random((H, W)) < frac
            noisy = np.where(hit, (noise_rng.random((H, W)) < 0.5).astype(np.float64), noisy)
        noisy = np.clip(noisy, 0.0, 1.0)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]  # noqa: E731
        return {"image": as_t(noisy), "mask": as_t(mask), "clean": as_t(clean), "kind": kind}


def _rotate(dy, dx, theta):
    c, s = math.cos(theta), math.sin(theta)
    return c * dy - s * dx, s * dy + c * dx


def _ellipse(rng, dy, dx, r):
    a = r * rng.uniform(0.75, 1.0)
    b = a * rng.uniform(0.5, 1.0)
    u, v = _rotate(dy, dx, rng.uniform(0, np.pi))
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _rounded_polygon(rng, dy, dx, r):
    n = int(rng.integers(3, 8))
    rounding = r * rng.uniform(0.1, 0.35)
    # vertices on a circle at sorted angles with a minimum gap: a convex polygon around 0
    gaps = rng.uniform(0.5, 1.5, size=n)
    angles = rng.uniform(0, 2 * np.pi) + np.cumsum(gaps / gaps.sum() * 2 * np.pi)
    core = r - rounding
    vy, vx = core * np.sin(angles), core * np.cos(angles)
    inside = np.ones(dy.shape, dtype=bool)
    dist2 = np.full(dy.shape, np.inf)
    for k in range(n):
        ay, ax, by, bx = vy[k], vx[k], vy[(k + 1) % n], vx[(k + 1) % n]
        ey, ex = by - ay, bx - ax
        # counter-clockwise in (x, y): the interior is on the left of each edge
        inside &= ex * (dy - ay) - ey * (dx - ax) >= 0
        t = np.clip(((dy - ay) * ey + (dx - ax) * ex) / (ey * ey + ex * ex), 0.0, 1.0)
        dist2 = np.minimum(dist2, (dy - ay - t * ey) ** 2 + (dx - ax - t * ex) ** 2)
    return inside | (dist2 <= rounding * rounding)


def _blob(rng, dy, dx, r):
    u, v = _rotate(dy, dx, rng.uniform(0, np.pi))
    v = v / rng.uniform(0.75, 1.0)  # a slight elongation
    theta = np.arctan2(u, v)
    radius = np.ones_like(theta)
    for k in (2, 3, 4):
        radius += rng.uniform(0.0, 0.09 / (k - 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= 0.92 * r * radius


_SHAPES = {"ellipse": _ellipse, "rounded_polygon": _rounded_polygon, "blob": _blob}


def _clutter_shape(rng, yy, xx, H, W, r):
    cy, cx = rng.uniform(0, H - 1), rng.uniform(0, W - 1)
    dy, dx = yy - cy, xx - cx
    if rng.random() < 0.5:  # small spot
        s = r * rng.uniform(0.08, 0.25)
        return dy * dy + dx * dx <= s * s
    # thin line segment
    u, v = _rotate(dy, dx, rng.uniform(0, np.pi))
    return (np.abs(u) <= rng.uniform(0.5, 1.5)) & (np.abs(v) <= r * rng.uniform(0.3, 0.9))


def _occluder(rng, dy, dx, r):
    """A bar crossing the object off-centre, or a disk biting into its rim."""
    if rng.random() < 0.5:
        u, v = _rotate(dy, dx, rng.uniform(0, np.pi))
        off = r * rng.uniform(-0.6, 0.6)
        return np.abs(u - off) <= r * rng.uniform(0.08, 0.2)
    phi = rng.uniform(0, 2 * np.pi)
    py, px = r * math.sin(phi), r * math.cos(phi)
    s = r * rng.uniform(0.25, 0.45)
    return (dy - py) ** 2 + (dx - px) ** 2 <= s * s
