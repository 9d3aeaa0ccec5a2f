"""Image and mask loading shared by the anomaly-detection datasets (MVTec AD, VisA).

Every failure names the file: a missing folder is a ``FileNotFoundError``, a malformed tree or an
unreadable / inconsistent file is a :class:`DatasetError` (a ``ValueError``). Nothing is skipped
silently.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset tree or file is malformed; the message names the offending path."""


class DatasetWarning(UserWarning):
    """Entries of a dataset tree were ignored (hidden files); the message counts them."""


def _warn_hidden(hidden: list[Path], what: str, directory: Path) -> None:
    if hidden:
        n = len(hidden)
        warnings.warn(f"ignored {n} hidden entr{'y' if n == 1 else 'ies'} in {what} {directory} "
                      f"(e.g. {hidden[0].name})", DatasetWarning, stacklevel=3)


@dataclass(frozen=True)
class AnomalySample:
    """One entry of an anomaly-detection split (decoded lazily by the dataset)."""
    image_path: Path
    mask_path: Path | None     # None for anomaly-free images (their mask is all zeros)
    label: int                 # 0 = normal, 1 = anomalous
    defect: str                # "good" for normal images, else the defect type


def check_size(size) -> int | None:
    """``size`` is the side of the square output, or None to keep the native resolution."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    return int(size)


def check_split(split, choices=("train", "test")) -> str:
    if split not in choices:
        raise ValueError(f"split must be one of {choices}, got {split!r}")
    return split


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        if path.exists():
            raise DatasetError(f"{what} {path} is not a folder")
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def list_images(directory: Path, what: str) -> list[Path]:
    """The image files of ``directory``, sorted by name. Hidden files (".DS_Store", ...) are
    ignored with a DatasetWarning counting them; any other non-image entry is an error, and so
    is an empty folder."""
    require_dir(directory, what)
    images, hidden = [], []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            hidden.append(entry)
            continue
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(entry)
        else:
            raise DatasetError(f"unexpected entry {entry} in {what} {directory} "
                               f"(expected image files {IMAGE_EXTENSIONS})")
    if not images:
        raise DatasetError(f"{what} {directory} contains no images")
    _warn_hidden(hidden, what, directory)
    return images


def list_subdirs(directory: Path, what: str) -> list[Path]:
    """Sub-folders of ``directory``, sorted; hidden entries ignored, stray files are errors."""
    require_dir(directory, what)
    subdirs, hidden = [], []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            hidden.append(entry)
            continue
        if not entry.is_dir():
            raise DatasetError(f"unexpected file {entry} in {what} {directory} (expected folders)")
        subdirs.append(entry)
    _warn_hidden(hidden, what, directory)
    return subdirs


def open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            out = img.copy()
            out.format = img.format     # copy() drops it; deep_gray needs it
            return out
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from None


def deep_gray(img, path) -> np.ndarray | None:
    """(H, W) float32 in [0, 1] of a 16-bit or float single-channel image, None for the 8-bit
    modes (which Pillow converts). 32-bit integers and floats outside [0, 1] are errors naming
    ``path``: their scale is unknown."""
    if img.mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if img.mode == "I":
        arr = np.asarray(img)
        if img.format == "PNG" and arr.size and 0 <= arr.min() and arr.max() <= 65535:
            return arr.astype(np.float32) / 65535.0       # a 16-bit PNG as older Pillow opens it
        raise DatasetError(f"image {path} has 32-bit integer pixels (mode 'I'), whose scale is "
                           f"unknown; save it as 8- or 16-bit, or as float in [0, 1]")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise DatasetError(f"image {path} has float pixels outside [0, 1] (range "
                               f"[{np.nanmin(arr):g}, {np.nanmax(arr):g}]); rescale it to [0, 1]")
        return arr
    return None


def _to_float_array(img, path: Path) -> np.ndarray:
    """(H, W, C) float32 in [0, 1] from 8-bit, 16-bit, float or palette images."""
    deep = deep_gray(img, path)
    if deep is not None:
        return deep[..., None]
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")             # palette, RGBA (alpha dropped), CMYK, 1-bit, LA
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def _resize(t: torch.Tensor, size: int | None, mode: str) -> torch.Tensor:
    if size is None or tuple(t.shape[-2:]) == (size, size):
        return t
    if mode == "nearest-exact":
        return F.interpolate(t[None], size=(size, size), mode=mode)[0]
    # antialiased bilinear (like PIL's BILINEAR when downscaling): weights are non-negative,
    # so the output stays in [0, 1]; the clamp only removes float rounding
    out = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def load_image(path: Path, size: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, size, size) float32 in [0, 1] (grayscale replicated to RGB) and the native (H, W)."""
    img = open_image(path)
    arr = _to_float_array(img, path)
    native = arr.shape[:2]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return _resize(t, size, "bilinear"), native


def load_mask(path: Path, size: int | None, native: tuple[int, int],
              image_path: Path) -> torch.Tensor:
    """(1, size, size) float32 0/1: any non-zero pixel (in any colour channel) is anomalous;
    resized with nearest-neighbour so it stays binary. Its native size must equal the image's.
    An alpha channel is ignored (an opaque black background is not a defect) and a palette
    image is read by its colours, not its indices."""
    img = open_image(path)
    if img.mode in ("P", "PA"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.ndim == 3:
        if img.mode in ("RGBA", "RGBa", "LA", "La"):
            arr = arr[..., :-1]
        arr = arr.any(axis=2)
    if arr.shape != tuple(native):
        raise DatasetError(f"mask {path} has size {arr.shape[1]}x{arr.shape[0]} (WxH) but its "
                           f"image {image_path} has size {native[1]}x{native[0]}")
    t = torch.from_numpy(np.ascontiguousarray(arr != 0, dtype=np.float32))[None]
    return _resize(t, size, "nearest-exact")


def load_sample(sample: AnomalySample, size: int | None) -> dict:
    """The dict every anomaly dataset returns: image (3, S, S), mask (1, S, S), label, path,
    defect."""
    image, native = load_image(sample.image_path, size)
    if sample.mask_path is None:
        mask = torch.zeros((1,) + tuple(image.shape[-2:]), dtype=torch.float32)
    else:
        mask = load_mask(sample.mask_path, size, native, sample.image_path)
    return {"image": image, "mask": mask, "label": sample.label,
            "path": str(sample.image_path), "defect": sample.defect}


class SampleListDataset(torch.utils.data.Dataset):
    """The part MVTec AD and VisA share: a checked list of ``AnomalySample`` (``self.samples``,
    built by the subclass), decoded lazily in ``__getitem__`` at ``self.size``."""

    samples: list[AnomalySample]
    size: int | None

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    @property
    def defects(self) -> list[str]:
        """The defect type of every item (for per-defect metrics), without decoding images."""
        return [s.defect for s in self.samples]

    @property
    def defect_types(self) -> list[str]:
        return sorted(set(self.defects))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return load_sample(self.samples[index], self.size)

    def verify(self) -> None:
        """Decode every image and mask now (raises on the first bad file)."""
        for sample in self.samples:
            load_sample(sample, self.size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, category={self.category!r}, "
                f"split={self.split!r}, size={self.size}, n={len(self)})")
