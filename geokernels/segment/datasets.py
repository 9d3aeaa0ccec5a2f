"""The datasets ``geokernels segment`` trains and evaluates on, by name.

* ``shapes``: :class:`geokernels.data.SyntheticShapes` with the *noisy* preset below (ellipses,
  rounded polygons, cell-like blobs; occluders over the object, clutter, Gaussian noise of
  std 0.05-0.15 and 0-3 % salt-and-pepper pixels; exact masks). The train split uses the data
  seed, the test split ``TEST_SEED_OFFSET + data seed``: disjoint scenes.
* ``coins``: :class:`geokernels.data.CoinsSegmentation` (crops of scikit-image's coins photo,
  one coin instance per crop, 18 train / 6 test coins), with Gaussian noise (std 0.05).
* ``folder``: :class:`geokernels.data.SegmentationFolder` on a user's ``images/`` + ``masks/``
  folder (``root``); resized to ``size`` (bilinear images, nearest masks).
"""
from __future__ import annotations

import torch

DATASETS = ("shapes", "coins", "folder")
TEST_SEED_OFFSET = 100_003

# the noisy convex-shape set of the results table (SyntheticShapes keyword arguments)
NOISY_SHAPES = dict(radius=(0.18, 0.32), noise_std=(0.05, 0.15), salt_pepper=(0.0, 0.03),
                    occlusion_prob=0.4, clutter=3, contrast=(0.25, 0.6))
COINS_NOISE_STD = 0.05
DEFAULT_LENGTH = {"shapes": {"train": 512, "test": 64}, "coins": {"train": 360, "test": 48}}


def make_dataset(name: str, split: str, *, size: int = 64, length: int | None = None,
                 data_seed: int = 0, root: str | None = None,
                 threshold: float | None = None) -> torch.utils.data.Dataset:
    """The named dataset's ``split`` ("train" or "test") as a torch Dataset of (image, mask)
    pairs: image float32 (C, size, size) in [0, 1], mask float32 (1, size, size) of 0/1.
    ``length`` (default: the whole folder / the preset) must not exceed a folder's images;
    ``threshold`` binarises a folder's soft masks (see SegmentationFolder)."""
    from geokernels.data import CoinsSegmentation, SegmentationFolder, SyntheticShapes

    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ValueError(f"length must be an int >= 1 or None, got {length!r}")
    if name == "folder":
        if root is None:
            raise ValueError("root: --dataset folder needs --root (a folder with images/ and masks/)")
        ds = SegmentationFolder(root, size=size, threshold=threshold)
        if length is None:
            return ds
        if length > len(ds):
            raise ValueError(f"length: asked for {length} images (--train-length / --length) "
                             f"but {root!r} holds {len(ds)}")
        return torch.utils.data.Subset(ds, range(length))
    if threshold is not None:
        raise ValueError(f"threshold: only the folder dataset reads mask files (got {name!r})")
    n = DEFAULT_LENGTH[name][split] if length is None else length
    if name == "shapes":
        seed = data_seed if split == "train" else TEST_SEED_OFFSET + data_seed
        return SyntheticShapes(length=n, size=size, seed=seed, **NOISY_SHAPES)
    return CoinsSegmentation(split=split, length=n, size=size, seed=data_seed,
                             noise_std=COINS_NOISE_STD)


def materialise(dataset, progress: bool = False, desc: str = "loading") -> tuple[torch.Tensor, torch.Tensor]:
    """All items stacked: images (N, C, H, W), masks (N, 1, H, W). Checks that every image and
    its mask agree in size and that all items share one size (else ValueError naming the item)."""
    from tqdm.auto import tqdm

    images, masks = [], []
    for i in tqdm(range(len(dataset)), desc=desc, disable=not progress, leave=False):
        image, mask = dataset[i]
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"item {i}: mask size {tuple(mask.shape[-2:])} differs from image "
                             f"size {tuple(image.shape[-2:])}")
        if images and image.shape != images[0].shape:
            raise ValueError(f"item {i}: image shape {tuple(image.shape)} differs from item 0's "
                             f"{tuple(images[0].shape)}; pass a size to resize all items")
        images.append(image)
        masks.append(mask)
    if not images:
        raise ValueError("dataset is empty")
    return torch.stack(images), torch.stack(masks)
