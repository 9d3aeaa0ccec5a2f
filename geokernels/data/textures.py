"""Offline anomaly-detection dataset: real texture photographs shipped inside scikit-image, with
synthetic defects and exact masks. Needs no download, deterministic by seed.

Normal images
    Square crops (``crop_size`` pixels, default 128) of a 512x512 grayscale photograph from
    ``skimage.data`` (``brick``, ``grass``, ``gravel``), replicated to RGB and resized to
    ``size`` (antialiased bilinear; no resampling when ``size == crop_size``).

Train/test split (disjoint by construction)
    For a photo of height H: train crops lie entirely in rows ``[0, H - H*5/16 - H/32)``, test
    crops entirely in rows ``[H - H*5/16, H)``; the ``H/32`` rows between are a guard band.
    For the 512-row photos: train rows 0-335, guard 336-351, test rows 352-511, full width.
    :meth:`TextureAnomalyDataset.crop_box` returns the crop of every item.

Defects (test split; the defective images cycle through the three types, so they come in
equal shares, +-1 when ``num_test_defective`` is not a multiple of 3). Each is drawn at the
output resolution and the mask is exactly the set of pixels that were replaced or blended: every
pixel outside the mask is bit-identical to the clean crop.
    ``foreign_texture``  a crop of a *different* photograph (random 90-degree rotation,
        contrast x[0.6, 1.6], brightness +-0.2) blended in (opacity 0.6-1) through a blob mask:
        2-octave Perlin noise thresholded inside a random ellipse (radii 15-35% of the image),
        covering 0.5-25% of the image.
    ``scratch``  1-2 quadratic Bezier curves (length >= 30% of the image), 1-3 pixels wide at
        size 128 (scaled with size), painted dark (0-0.15) or bright (0.85-1) at opacity 0.7-1.
    ``spot``  1-3 rotated ellipses (radii 3-10% of the image): half of the images get an
        intensity spot (grey level on the opposite side of the local mean), half a colour spot
        (random hue, full saturation), opacity 0.5-0.9.

Determinism: item ``i`` of (category, split) is generated from
``numpy.random.default_rng([seed, category id, split id, i])`` whatever the access order.
"""
from __future__ import annotations

import colorsys
import functools

import numpy as np
import scipy.ndimage
import torch

from geokernels.data._io import _resize, check_split

TEXTURE_CATEGORIES = ("brick", "grass", "gravel")
TEXTURE_DEFECT_TYPES = ("foreign_texture", "scratch", "spot")
_SPLIT_ID = {"train": 0, "test": 1}


def texture_categories() -> tuple[str, ...]:
    """Names accepted by :class:`TextureAnomalyDataset` (photos shipped with scikit-image)."""
    return TEXTURE_CATEGORIES


@functools.lru_cache(maxsize=None)
def _photo(category: str) -> np.ndarray:
    """(H, W) float32 in [0, 1], read-only."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, category)())
    if image.ndim == 3:                                   # future colour textures: luminance
        image = image[..., :3].mean(axis=2)
    out = (image.astype(np.float32) / 255.0)
    out.setflags(write=False)
    return out


def split_rows(height: int) -> dict[str, tuple[int, int]]:
    """Row ranges [start, stop) of the train and test regions of a photo of ``height`` rows."""
    test_rows = height * 5 // 16
    guard = height // 32
    return {"train": (0, height - test_rows - guard), "test": (height - test_rows, height)}


# --------------------------------------------------------------------------------------------
# noise and shapes
# --------------------------------------------------------------------------------------------
def perlin_noise(shape: tuple[int, int], cells: tuple[int, int],
                 rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise with ``cells`` lattice cells per axis, roughly in [-1, 1]."""
    height, width = shape
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(cells[0] + 1, cells[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.arange(height) * (cells[0] / height)
    x = np.arange(width) * (cells[1] / width)
    yi, xi = y.astype(int), x.astype(int)
    yf, xf = y - yi, x - xi
    rows_per_cell = np.bincount(yi, minlength=cells[0])
    cols_per_cell = np.bincount(xi, minlength=cells[1])

    def corner(dy, dx):
        # the lattice gradient of every pixel's (dy, dx) cell corner, by block repetition
        g = gradients[dy:dy + cells[0], dx:dx + cells[1]]
        g = np.repeat(np.repeat(g, rows_per_cell, axis=0), cols_per_cell, axis=1)
        return g[..., 0] * (yf - dy)[:, None] + g[..., 1] * (xf - dx)[None, :]

    def fade(t):
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(yf)[:, None], fade(xf)[None, :]
    top = corner(0, 0) + u * (corner(1, 0) - corner(0, 0))
    bottom = corner(0, 1) + u * (corner(1, 1) - corner(0, 1))
    return np.sqrt(2.0) * (top + v * (bottom - top))


def _ellipse_radius(size, cy, cx, ry, rx, angle):
    """Normalised elliptic radius (< 1 inside) of every pixel."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    return np.sqrt(((c * dy + s * dx) / ry) ** 2 + ((-s * dy + c * dx) / rx) ** 2)


def _blob_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    for _ in range(64):
        cells = int(rng.choice([2, 4, 6]))
        noise = perlin_noise((size, size), (cells, cells), rng)
        noise += 0.5 * perlin_noise((size, size), (2 * cells, 2 * cells), rng)
        window = _ellipse_radius(size, rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size,
                                 rng.uniform(0.15, 0.35) * size, rng.uniform(0.15, 0.35) * size,
                                 rng.uniform(0, np.pi))
        mask = (noise > rng.uniform(-0.1, 0.3)) & (window < 1.0)
        if 0.005 <= mask.mean() <= 0.25:
            return mask
    return window < 0.5                                   # practically never reached


def _scratch_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.draw import bezier_curve

    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        while True:
            p0 = rng.uniform(0.1, 0.9, 2) * size
            p2 = rng.uniform(0.1, 0.9, 2) * size
            length = np.hypot(*(p2 - p0))
            if length >= 0.3 * size:
                break
        normal = np.array([-(p2 - p0)[1], (p2 - p0)[0]]) / length
        p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.25, 0.25) * length
        p0, p1, p2 = (np.clip(np.round(p), 0, size - 1).astype(int) for p in (p0, p1, p2))
        rr, cc = bezier_curve(p0[0], p0[1], p1[0], p1[1], p2[0], p2[1], 1.0, shape=(size, size))
        line = np.zeros_like(mask)
        line[rr, cc] = True
        radius = int(rng.integers(0, max(1, round(size / 128)) + 1))   # width 1 .. 2r+1 pixels
        if radius:
            yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
            line = scipy.ndimage.binary_dilation(line, structure=yy ** 2 + xx ** 2 <= radius ** 2)
        mask |= line
    return mask


def _spot_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        ry, rx = np.maximum(rng.uniform(0.03, 0.1, 2) * size, 2.0)
        mask |= _ellipse_radius(size, rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size,
                                ry, rx, rng.uniform(0, np.pi)) < 1.0
    return mask


def _paint(image: np.ndarray, mask: np.ndarray, content: np.ndarray, opacity: float) -> np.ndarray:
    """Blend ``content`` ((3,) colour or (3, S, S)) into ``image`` on ``mask`` only."""
    out = image.copy()
    target = content[:, mask] if content.ndim == 3 else content[:, None]
    out[:, mask] = ((1.0 - opacity) * image[:, mask] + opacity * target).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------
class TextureAnomalyDataset(torch.utils.data.Dataset):
    """Offline texture anomaly dataset (see the module docstring for the exact recipe).

    Args:
        category: one of :func:`texture_categories` ("brick", "grass", "gravel").
        split: "train" (normal crops only) or "test" (``num_test_good`` normal crops followed by
            ``num_test_defective`` defective ones cycling foreign_texture, scratch, spot).
        size: output side in pixels. crop_size: side of the crop taken from the photo
            (<= 160 so that it fits in the test region).
        seed: any non-negative int; the same seed gives bit-identical items.

    Items are dicts like the MVTec / VisA loaders: ``image`` float32 (3, size, size) in [0, 1],
    ``mask`` float32 (1, size, size) 0/1, ``label`` 0/1, ``path`` (``skimage:<category>/<split>/
    <defect>/<index>``), ``defect`` ("good" or the defect type). ``defects`` / ``labels`` give all
    items' values without generating images (for per-defect metrics); ``foreign_source(i)`` names
    the photo pasted into a foreign-texture item (for per-source metrics).
    """

    def __init__(self, category: str = "brick", split: str = "train", size: int = 128,
                 seed: int = 0, *, num_train: int = 200, num_test_good: int = 60,
                 num_test_defective: int = 60, crop_size: int = 128):
        if category not in TEXTURE_CATEGORIES:
            raise ValueError(f"category must be one of {TEXTURE_CATEGORIES}, got {category!r}")
        self.category = category
        self.split = check_split(split)
        for name, value, low in (("size", size, 8), ("seed", seed, 0), ("num_train", num_train, 1),
                                 ("num_test_good", num_test_good, 0),
                                 ("num_test_defective", num_test_defective, 0),
                                 ("crop_size", crop_size, 8)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        photo = _photo(category)
        self._rows = split_rows(photo.shape[0])
        for region, (start, stop) in self._rows.items():
            if crop_size > min(stop - start, photo.shape[1]):
                raise ValueError(f"crop_size must be <= {stop - start} (the {region} region of "
                                 f"the {category} photo), got {crop_size}")
        if self.split == "test" and num_test_good + num_test_defective == 0:
            raise ValueError("num_test_good + num_test_defective must be >= 1")
        self.size, self.seed, self.crop_size = int(size), int(seed), int(crop_size)
        if self.split == "train":
            self.defects = ["good"] * int(num_train)
        else:
            self.defects = (["good"] * int(num_test_good)
                            + [TEXTURE_DEFECT_TYPES[i % len(TEXTURE_DEFECT_TYPES)]
                               for i in range(int(num_test_defective))])
        self.labels = [int(d != "good") for d in self.defects]

    @property
    def defect_types(self) -> tuple[str, ...]:
        return TEXTURE_DEFECT_TYPES

    def __len__(self) -> int:
        return len(self.defects)

    def _index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        i = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return i

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, TEXTURE_CATEGORIES.index(self.category),
                                     _SPLIT_ID[self.split], i])

    @staticmethod
    def _draw_box(rng, rows, width, crop):
        top = int(rng.integers(rows[0], rows[1] - crop + 1))
        left = int(rng.integers(0, width - crop + 1))
        return top, left

    def crop_box(self, index: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of item ``index``'s crop in the photo (bottom/right
        exclusive)."""
        i = self._index(index)
        top, left = self._draw_box(self._rng(i), self._rows[self.split],
                                   _photo(self.category).shape[1], self.crop_size)
        return top, left, top + self.crop_size, left + self.crop_size

    def _gray_to_rgb(self, crop: np.ndarray) -> np.ndarray:
        """(crop, crop) grey patch -> (3, size, size) float32."""
        if crop.shape[0] != self.size:
            crop = _resize(torch.from_numpy(np.array(crop, dtype=np.float32))[None],
                           self.size, "bilinear")[0].numpy()
        return np.repeat(np.asarray(crop, dtype=np.float32)[None], 3, axis=0)

    def _crop(self, photo: np.ndarray, top: int, left: int) -> np.ndarray:
        return self._gray_to_rgb(photo[top:top + self.crop_size, left:left + self.crop_size])

    def generate(self, index: int) -> tuple[dict, torch.Tensor]:
        """Item ``index`` and its defect-free version (3, size, size) (identical for normal
        items): ``image == clean`` exactly outside ``mask``."""
        return self._generate(index)[:2]

    def foreign_source(self, index: int) -> str | None:
        """The category of the photograph pasted into item ``index`` when its defect is
        ``foreign_texture``, else None (for per-source diagnostics)."""
        return self._generate(index)[2]

    def _generate(self, index: int) -> tuple[dict, torch.Tensor, str | None]:
        i = self._index(index)
        rng = self._rng(i)
        photo = _photo(self.category)
        top, left = self._draw_box(rng, self._rows[self.split], photo.shape[1], self.crop_size)
        clean = self._crop(photo, top, left)
        defect = self.defects[i]
        image, mask = clean, np.zeros((self.size, self.size), dtype=bool)
        source = None
        if defect == "foreign_texture":
            image, mask, source = self._foreign_texture(clean, rng)
        elif defect == "scratch":
            mask = _scratch_mask(self.size, rng)
            value = rng.uniform(0.0, 0.15) if rng.random() < 0.5 else rng.uniform(0.85, 1.0)
            image = _paint(clean, mask, np.full(3, value, np.float32), rng.uniform(0.7, 1.0))
        elif defect == "spot":
            mask = _spot_mask(self.size, rng)
            if rng.random() < 0.5:                        # intensity spot, against the local mean
                dark = clean[:, mask].mean() > 0.5
                value = rng.uniform(0.0, 0.2) if dark else rng.uniform(0.8, 1.0)
                colour = np.full(3, value, np.float32)
            else:                                          # colour spot
                colour = np.array(colorsys.hsv_to_rgb(rng.uniform(), 1.0, rng.uniform(0.5, 1.0)),
                                  np.float32)
            image = _paint(clean, mask, colour, rng.uniform(0.5, 0.9))
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],
            "label": self.labels[i],
            "path": f"skimage:{self.category}/{self.split}/{defect}/{i:04d}",
            "defect": defect,
        }
        return sample, torch.from_numpy(np.ascontiguousarray(clean, dtype=np.float32)), source

    def _foreign_texture(self, clean: np.ndarray, rng: np.random.Generator):
        mask = _blob_mask(self.size, rng)
        others = [c for c in TEXTURE_CATEGORIES if c != self.category]
        name = others[int(rng.integers(len(others)))]
        source = _photo(name)
        top = int(rng.integers(0, source.shape[0] - self.crop_size + 1))
        left = int(rng.integers(0, source.shape[1] - self.crop_size + 1))
        patch = np.rot90(source[top:top + self.crop_size, left:left + self.crop_size],
                         int(rng.integers(4)))
        patch = self._gray_to_rgb(patch)
        mean = patch.mean()
        patch = np.clip((patch - mean) * rng.uniform(0.6, 1.6) + mean + rng.uniform(-0.2, 0.2),
                        0.0, 1.0).astype(np.float32)
        return _paint(clean, mask, patch, rng.uniform(0.6, 1.0)), mask, name

    def __getitem__(self, index: int) -> dict:
        return self.generate(index)[0]

    def __repr__(self) -> str:
        return (f"TextureAnomalyDataset(category={self.category!r}, split={self.split!r}, "
                f"size={self.size}, seed={self.seed}, n={len(self)})")
