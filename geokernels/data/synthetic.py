"""Synthetic shapes generated on the fly (no files, no downloads).

``notebook_shape`` is the test shape of the D-Convexity paper's notebook (SPEC.md 1.6): a disk
with a sector cut out, turned into a soft mask through its signed distance function.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def sector_disk_mask(size: int = 256, radius: float = 80.0,
                     removed_sector: tuple[float, float] = (45.0, 180.0)) -> np.ndarray:
    """Boolean (size, size) mask of a disk with an angular sector removed ("pac-man").

    The disk is centred at ((size-1)/2, (size-1)/2) in pixel-centre coordinates. Angles are in
    degrees, counter-clockwise from the +x axis (right) with y pointing *up* on screen, i.e.
    theta = atan2(-(row - cy), col - cx) in [0, 360); pixels with
    ``removed_sector[0] <= theta <= removed_sector[1]`` are removed. The default removes the
    upper-left quarter and a bit (45 to 180 degrees, 135 degrees in all).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    lo, hi = removed_sector
    if not (0.0 <= lo <= hi <= 360.0):
        raise ValueError(f"removed_sector must satisfy 0 <= lo <= hi <= 360, got {removed_sector}")
    c = (size - 1) / 2.0
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    y, x = c - rows, cols - c  # y up
    theta = np.degrees(np.arctan2(y, x)) % 360.0
    disk = x * x + y * y <= radius * radius
    return disk & ~((theta >= lo) & (theta <= hi))


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean signed distance of a boolean mask, positive inside, negative outside.

    sdf = EDT(mask) - EDT(~mask) (scipy.ndimage.distance_transform_edt: distance of each pixel
    to the nearest pixel of the other class), so inside pixels are >= 1 and outside pixels are
    <= -1: the zero level lies between the classes and {sdf > 0} is exactly the mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.all() or not mask.any():
        raise ValueError("mask must contain both foreground and background pixels")
    return ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)


def notebook_shape(size: int = 256, radius: float = 80.0,
                   removed_sector: tuple[float, float] = (45.0, 180.0),
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The paper notebook's test mask u = sigmoid(SDF / max|SDF|), shape (1, 1, size, size).

    The shape is :func:`sector_disk_mask` (a radius-80 disk in a 256 x 256 image with the 45 to
    180 degree sector removed); SDF is :func:`signed_distance` (positive inside). Values lie in
    (0, 1), and the super-level set {u >= 0.5} is the shape itself (solidity about 0.85).
    """
    sdf = signed_distance(sector_disk_mask(size, radius, removed_sector))
    u = 1.0 / (1.0 + np.exp(-sdf / np.abs(sdf).max()))
    return torch.from_numpy(u).to(dtype).view(1, 1, size, size)
