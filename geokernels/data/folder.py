"""Loader for a user's folder of image / mask pairs (segmentation).

Layout::

    root/
      images/   a.png  b.jpg  ...
      masks/    a.png  b.png  ...     (same stem as the image, plus an optional mask_suffix)

Images: 8-bit files (any Pillow mode: L, RGB, palette, ...) are converted by Pillow as usual;
16-bit grayscale files are scaled by 1/65535 and float files (mode F, e.g. float TIFF) must
already hold values in [0, 1]; 32-bit integer files are an error (their scale is unknown).
Nothing is clipped or rounded to 8 bits on the way.

Masks are read as single-channel images and must be binary: values {0, 1}, {0, 255} or, for
16-bit files, {0, 65535} (or a single one of them). Palette masks are read by their indices.
Anything else is an error, never a silent threshold, unless ``threshold`` is given (then mask =
value > threshold, on the file's own scale: 0..255, 0..65535 or 0..1).
"""
from __future__ import annotations

import os
import warnings
from numbers import Integral, Real

import numpy as np
import torch

from geokernels.data._io import deep_gray, open_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _list_images(folder: str) -> dict[str, str]:
    """stem -> path of the image files in ``folder``; other entries are skipped with a warning
    that counts them (hidden files silently: they are never data); two images with one stem are
    an error (which one is meant?)."""
    images, skipped = {}, []
    for f in sorted(os.listdir(folder)):
        if f.startswith("."):
            continue
        path = os.path.join(folder, f)
        if not f.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
            skipped.append(f)
            continue
        stem = os.path.splitext(f)[0]
        if stem in images:
            raise ValueError(f"two images with the stem {stem!r} in {folder!r}: "
                             f"{os.path.basename(images[stem])!r} and {f!r}")
        images[stem] = path
    if skipped:
        warnings.warn(f"skipped {len(skipped)} non-image entr{'y' if len(skipped) == 1 else 'ies'}"
                      f" in {folder!r}, e.g. {skipped[:3]}", stacklevel=3)
    return images


class SegmentationFolder(torch.utils.data.Dataset):
    """Image / mask pairs from ``root/<image_dir>`` and ``root/<mask_dir>`` (torch Dataset).

    Args:
        root: the folder holding the two sub-folders.
        image_dir, mask_dir: sub-folder names (default "images", "masks").
        mask_suffix: the mask of ``x.png`` is ``<mask_dir>/x<mask_suffix>.<any ext>``.
        grayscale: images as (1, H, W) (default) or RGB (3, H, W).
        size: optional (H, W) or int: images are resized bilinearly, masks by nearest neighbour.
        threshold: None (default: masks must be binary) or a number to binarise soft masks
            (mask = value > threshold on the file's scale).

    Returns per item ``(image, mask)``: image float32 (1 or 3, H, W) in [0, 1], mask float32
    (1, H, W) of 0/1. Construction fails with ValueError for a missing or empty folder, images
    without masks (or masks without images), and image/mask size mismatches; a non-binary mask
    raises ValueError naming the file when it is loaded.
    """

    def __init__(self, root: str, image_dir: str = "images", mask_dir: str = "masks",
                 mask_suffix: str = "", grayscale: bool = True, size=None,
                 threshold: float | None = None):
        from PIL import Image

        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        root = os.fspath(root)
        img_folder, mask_folder = os.path.join(root, image_dir), os.path.join(root, mask_dir)
        for name, folder in (("image_dir", img_folder), ("mask_dir", mask_folder)):
            if not os.path.isdir(folder):
                raise ValueError(f"{name}: folder {folder!r} does not exist")
        images = _list_images(img_folder)
        masks = _list_images(mask_folder)
        if not images:
            raise ValueError(f"root: no images ({', '.join(IMAGE_EXTENSIONS)}) in {img_folder!r}")
        masks_by_stem, unmatched = {}, []
        for stem, path in masks.items():
            if mask_suffix and not stem.endswith(mask_suffix):
                unmatched.append(os.path.basename(path))
                continue
            masks_by_stem[stem[: len(stem) - len(mask_suffix)] if mask_suffix else stem] = path
        if unmatched:
            warnings.warn(f"skipped {len(unmatched)} file(s) in {mask_folder!r} without the "
                          f"mask_suffix {mask_suffix!r}, e.g. {unmatched[:3]}", stacklevel=2)
        missing = [s for s in images if s not in masks_by_stem]
        if missing:
            raise ValueError(f"mask_dir: no mask for {len(missing)} image(s) in {mask_folder!r}, "
                             f"e.g. {missing[:3]} (mask_suffix={mask_suffix!r})")
        orphans = [s for s in masks_by_stem if s not in images]
        if orphans:
            raise ValueError(f"image_dir: no image for {len(orphans)} mask(s) in {img_folder!r}, "
                             f"e.g. {orphans[:3]}")
        self.pairs = [(images[s], masks_by_stem[s]) for s in sorted(images)]
        for ip, mp in self.pairs:  # headers only: cheap
            sizes = []
            for path in (ip, mp):
                try:
                    with Image.open(path) as im:
                        sizes.append(im.size)
                except (OSError, SyntaxError, ValueError) as exc:  # incl. UnidentifiedImageError
                    raise ValueError(f"cannot read image {path!r}: {exc}") from None
            if sizes[0] != sizes[1]:
                raise ValueError(f"mask {mp!r} has size {sizes[1][::-1]} (H, W) but its image "
                                 f"{ip!r} has {sizes[0][::-1]}")
        if size is not None:
            if isinstance(size, Integral) and not isinstance(size, bool):
                size = (int(size), int(size))
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in size)):
                raise ValueError(f"size must be a positive int or an (H, W) pair, got {size!r}")
            size = (int(size[0]), int(size[1]))
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, Real)):
            raise TypeError(f"threshold must be a number or None, got {type(threshold).__name__}")
        self.size = size
        self.grayscale = bool(grayscale)
        self.threshold = None if threshold is None else float(threshold)
        self._warned_palettes: set[str] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def _load_mask(self, path: str) -> np.ndarray:
        im = open_image(path)
        if im.mode == "P":   # read by index (VOC style: index 0 = black background)
            first = tuple((im.getpalette() or [0, 0, 0])[:3])
            if first != (0, 0, 0) and path not in self._warned_palettes:
                self._warned_palettes.add(path)
                warnings.warn(f"mask {path!r} is a palette image whose index 0 is the colour "
                              f"{first}, not black: it is read by index (index 0 = background), "
                              f"so it may come out inverted; save it as a grayscale mask",
                              stacklevel=3)
        raw = im.mode in ("L", "1", "I", "F", "P") or im.mode.startswith("I;16")
        arr = np.asarray(im if raw else im.convert("L"))    # palette: the indices
        arr = arr.astype(np.float64)
        if self.threshold is not None:
            return (arr > self.threshold).astype(np.float32)
        values = np.unique(arr)
        if np.all(np.isin(values, (0.0, 1.0))):
            return arr.astype(np.float32)
        for on in (255.0, 65535.0):
            if np.all(np.isin(values, (0.0, on))):
                return (arr > 0).astype(np.float32)
        raise ValueError(f"mask {path!r} is not binary: values {values[:6].tolist()}"
                         f"{'...' if len(values) > 6 else ''}; expected {{0, 1}}, {{0, 255}} or "
                         f"{{0, 65535}} (or binarise with threshold=... / --mask-threshold)")

    def __getitem__(self, index: int):
        from PIL import Image

        ip, mp = self.pairs[index]
        im = open_image(ip)
        deep = deep_gray(im, ip)
        if deep is None:                                  # 8-bit: Pillow converts and resizes
            im = im.convert("L" if self.grayscale else "RGB")
            if self.size is not None:
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
        else:                                             # 16-bit / float: resized in float
            if self.size is not None:
                deep = np.asarray(Image.fromarray(deep, mode="F").resize(
                    (self.size[1], self.size[0]), Image.BILINEAR)).clip(0.0, 1.0)
            arr = deep if self.grayscale else np.repeat(deep[..., None], 3, axis=2)
        mask = self._load_mask(mp)
        if self.size is not None:
            mim = Image.fromarray((mask * 255).astype(np.uint8)).resize(
                (self.size[1], self.size[0]), Image.NEAREST)
            mask = (np.asarray(mim) > 127).astype(np.float32)
        image = torch.from_numpy(arr.copy())
        image = image[None] if image.dim() == 2 else image.permute(2, 0, 1).contiguous()
        return image, torch.from_numpy(mask.copy())[None]
