"""A real-image segmentation set from the ``coins`` photograph shipped inside scikit-image.

``skimage.data.coins()`` is a 303 x 384 grey-scale photo of 24 coins on a darker background
(Greek coins from Pompeii, courtesy of the Brooklyn Museum; public domain, bundled with
scikit-image, so no download is ever needed). Masks are derived once, deterministically:

1. elevation map = Sobel gradient magnitude of the photo;
2. markers: pixels darker than 30 are background, brighter than 150 are coin (the thresholds of
   scikit-image's "comparing edge-based and region-based segmentation" example, checked by eye on
   this photo: the dark background is < 30 everywhere, the coin rims and faces mostly > 150);
3. marker-controlled watershed of the elevation map -> coin / background;
4. holes filled (dark engravings inside a coin stay coin), a binary opening with a radius-1 disk
   (removes one-pixel spurs along the rims);
5. connected components (8-connectivity) smaller than 200 pixels are dropped (a 2-pixel speck);
   what remains are exactly the 24 coins (areas about 1080..3140 pixels, solidity 0.95..0.98).

Each coin is one *instance*. An item is a square crop centred (with a small jitter) on one coin,
about ``crop_scale`` coin diameters wide, resized to ``size`` x ``size``; its mask is that coin only
(neighbouring coins cut by the crop are background): object-centric segmentation of a near-convex
object among distractors, the setting of a convexity prior. Coins are split by instance: the
coins with index 3, 7, 11, 15, 19, 23 (row-major order of their centres) are the test split, the
other 18 the train split. Item ``index`` uses coin ``index % n_coins`` and a random stream seeded by
(seed, split, index): crop scale, jitter, flips / quarter turns (train split only) and optional
Gaussian noise. Everything is reproducible and needs only scikit-image.
"""
from __future__ import annotations

import functools
from numbers import Integral, Real

import numpy as np
import torch

TEST_COINS = (3, 7, 11, 15, 19, 23)
SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def coin_instances() -> tuple[np.ndarray, np.ndarray]:
    """``(photo, labels)``: the photo as float64 (303, 384) in [0, 1] and an int32 label image
    (0 = background, 1..24 = coins numbered in row-major order of their centres: rows of coins
    from the top, left to right inside a row). See the module docstring for the derivation."""
    from scipy import ndimage
    from skimage import data, filters, measure, morphology, segmentation

    photo = data.coins()
    elevation = filters.sobel(photo)
    markers = np.zeros(photo.shape, dtype=np.int32)
    markers[photo < 30] = 1
    markers[photo > 150] = 2
    coins = segmentation.watershed(elevation, markers) == 2
    coins = ndimage.binary_fill_holes(coins)
    coins = ndimage.binary_opening(coins, structure=morphology.disk(1))
    labels = measure.label(coins, connectivity=2)
    regions = [r for r in measure.regionprops(labels) if r.area >= 200]
    # row-major order: group centres into rows (coins in one row differ by < 30 px in y)
    centres = np.array([r.centroid for r in regions])
    row_of = np.round((centres[:, 0] - centres[:, 0].min()) / 65.0).astype(int)
    order = sorted(range(len(regions)), key=lambda k: (row_of[k], centres[k, 1]))
    out = np.zeros(photo.shape, dtype=np.int32)
    for new, k in enumerate(order, start=1):
        out[labels == regions[k].label] = new
    return photo.astype(np.float64) / 255.0, out


def _crop(array: np.ndarray, top: int, left: int, side: int, mode: str) -> np.ndarray:
    """``array[top:top+side, left:left+side]`` with out-of-image pixels padded (``mode``)."""
    H, W = array.shape
    pad = max(0, -top, -left, top + side - H, left + side - W)
    if pad:
        array = np.pad(array, pad, mode=mode)
        top, left = top + pad, left + pad
    return array[top:top + side, left:left + side]


class CoinsSegmentation(torch.utils.data.Dataset):
    """Crops of the scikit-image coins photo, one coin instance per item (torch Dataset).

    Args:
        split: "train" (18 coins), "test" (6 coins: ``TEST_COINS``) or "all" (24).
        length: number of items (default: one per coin of the split). Items cycle over the coins.
        size: output side in pixels (>= 16).
        seed: item ``index`` depends on (seed, split, index) only.
        crop_scale: crop side in coin diameters, (min, max) or a number.
        jitter: maximum centre offset, as a fraction of the coin diameter.
        augment: random flips and quarter turns (default: True for "train", False otherwise).
        noise_std: standard deviation of additive Gaussian noise on the [0, 1] image.

    Returns per item ``(image, mask)``: float32 (1, size, size) in [0, 1] and float32 (1, size,
    size) of exact 0/1 (the centre coin). ``coin_index(index)`` gives the coin label (1..24).
    """

    def __init__(self, split: str = "train", length: int | None = None, size: int = 64,
                 seed: int = 0, crop_scale=(1.5, 1.9), jitter: float = 0.12,
                 augment: bool | None = None, noise_std: float = 0.0):
        from geokernels.data.shapes import _check_range

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, Integral) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if (isinstance(jitter, bool) or not isinstance(jitter, Real)
                or not 0.0 <= float(jitter) <= 0.5):
            raise ValueError(f"jitter must be in [0, 0.5], got {jitter!r}")
        if (isinstance(noise_std, bool) or not isinstance(noise_std, Real)
                or not 0.0 <= float(noise_std) < float("inf")):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        self.crop_scale = _check_range(crop_scale, "crop_scale", 1.0, 4.0)
        _, labels = coin_instances()
        n = int(labels.max())
        if split == "train":
            self.coins = [c for c in range(1, n + 1) if c - 1 not in TEST_COINS]
        elif split == "test":
            self.coins = [c + 1 for c in TEST_COINS if c < n]
        else:
            self.coins = list(range(1, n + 1))
        if length is None:
            length = len(self.coins)
        if isinstance(length, bool) or not isinstance(length, Integral) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.split, self.length, self.size, self.seed = split, int(length), int(size), int(seed)
        self.jitter, self.noise_std = float(jitter), float(noise_std)
        self.augment = (split == "train") if augment is None else bool(augment)

    def __len__(self) -> int:
        return self.length

    def coin_index(self, index: int) -> int:
        return self.coins[index % len(self.coins)]

    def __getitem__(self, index: int):
        from skimage.transform import resize

        if isinstance(index, bool) or not isinstance(index, Integral):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a set of {self.length} items")
        photo, labels = coin_instances()
        coin = self.coin_index(index)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
        instance = labels == coin
        rows, cols = np.nonzero(instance)
        cy, cx = rows.mean(), cols.mean()
        diameter = 2.0 * np.sqrt(instance.sum() / np.pi)
        side = max(8, int(round(rng.uniform(*self.crop_scale) * diameter)))
        cy += rng.uniform(-self.jitter, self.jitter) * diameter
        cx += rng.uniform(-self.jitter, self.jitter) * diameter
        top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
        img = _crop(photo, top, left, side, "reflect")
        # the mask is the crop of *this* instance; padding with zeros keeps it exact
        msk = _crop(instance.astype(np.float64), top, left, side, "constant")
        img = resize(img, (self.size, self.size), order=1, anti_aliasing=True, mode="reflect")
        msk = resize(msk, (self.size, self.size), order=1, anti_aliasing=True, mode="constant") >= 0.5
        if self.augment:
            k = int(rng.integers(4))
            flip = bool(rng.integers(2))
            img, msk = np.rot90(img, k), np.rot90(msk, k)
            if flip:
                img, msk = img[:, ::-1], msk[:, ::-1]
        if self.noise_std > 0:
            img = np.clip(img + self.noise_std * rng.standard_normal(img.shape), 0.0, 1.0)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]  # noqa: E731
        return as_t(img), as_t(msk)
