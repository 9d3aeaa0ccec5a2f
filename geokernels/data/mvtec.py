"""MVTec AD folder loader (Bergmann et al., CVPR 2019), official layout:

```
<root>/<category>/train/good/*.png
<root>/<category>/test/good/*.png
<root>/<category>/test/<defect>/*.png
<root>/<category>/ground_truth/<defect>/<name>_mask.png      (one per anomalous test image)
```
"""
from __future__ import annotations

from pathlib import Path

from geokernels.data._io import (AnomalySample, DatasetError, SampleListDataset, check_size,
                                 check_split, list_images, list_subdirs, require_dir)

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                    "zipper")
_GOOD = "good"


class MVTecAD(SampleListDataset):
    """One category and split of MVTec AD, read from the official folder layout.

    Args:
        root: the folder holding the category folders.
        category: e.g. "bottle" (any folder name is accepted, so custom categories in the same
            layout work too; see :data:`MVTEC_CATEGORIES`).
        split: "train" (``train/good`` only) or "test" (every ``test/<defect>`` folder).
        size: images and masks are resized to (size, size) (antialiased bilinear for images,
            nearest for masks); None keeps the native resolution.

    Items are dicts: ``image`` float32 (3, size, size) in [0, 1] (grayscale categories are
    replicated to RGB), ``mask`` float32 (1, size, size) with values 0/1, ``label`` 0/1, ``path``
    (str), ``defect`` ("good" or the test folder name).

    The tree is checked when the dataset is built (missing folders, stray files, empty folders,
    anomalous images without a mask, masks without an image -> errors naming the path); files are
    decoded in ``__getitem__`` (unreadable files and mask/image size mismatches -> DatasetError
    naming the file). :meth:`verify` decodes everything up front.
    """

    def __init__(self, root, category: str, split: str = "test", size: int | None = 256):
        self.root = Path(root)
        self.category = category
        self.split = check_split(split)
        self.size = check_size(size)
        if not isinstance(category, str) or not category:
            raise ValueError(f"category must be a non-empty string, got {category!r}")
        require_dir(self.root, "MVTec AD root")
        category_dir = self.root / category
        if not category_dir.is_dir():
            raise FileNotFoundError(
                f"category folder {category_dir} does not exist; categories found in "
                f"{self.root}: {self.available_categories(self.root)}")
        self.samples = (self._scan_train(category_dir) if self.split == "train"
                        else self._scan_test(category_dir))

    @staticmethod
    def available_categories(root) -> list[str]:
        """Sub-folders of ``root`` that contain both ``train`` and ``test``."""
        root = Path(root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if (p / "train").is_dir() and (p / "test").is_dir())

    @staticmethod
    def _scan_train(category_dir: Path) -> list[AnomalySample]:
        train_dir = category_dir / "train"
        subdirs = list_subdirs(train_dir, "train folder")
        extra = [d for d in subdirs if d.name != _GOOD]
        if extra:
            raise DatasetError(f"train folder {train_dir} must contain only 'good', found {extra[0]}")
        images = list_images(train_dir / _GOOD, "train folder")
        return [AnomalySample(p, None, 0, _GOOD) for p in images]

    @staticmethod
    def _scan_test(category_dir: Path) -> list[AnomalySample]:
        test_dir = category_dir / "test"
        defect_dirs = list_subdirs(test_dir, "test folder")
        if not defect_dirs:
            raise DatasetError(f"test folder {test_dir} contains no defect folders")
        gt_dir = category_dir / "ground_truth"
        anomalous = [d for d in defect_dirs if d.name != _GOOD]
        if anomalous:
            gt_subdirs = list_subdirs(gt_dir, "ground-truth folder")
            known = {d.name for d in anomalous}
            for d in gt_subdirs:
                if d.name not in known:
                    raise DatasetError(f"ground-truth folder {d} has no matching test folder "
                                       f"{test_dir / d.name}")
        samples = []
        for defect_dir in defect_dirs:
            images = list_images(defect_dir, "test folder")
            if defect_dir.name == _GOOD:
                samples += [AnomalySample(p, None, 0, _GOOD) for p in images]
                continue
            mask_dir = gt_dir / defect_dir.name
            if not mask_dir.is_dir():
                raise DatasetError(f"missing mask folder {mask_dir} for the anomalous images in "
                                   f"{defect_dir}")
            expected = {}
            for p in images:
                mask = mask_dir / f"{p.stem}_mask.png"
                if not mask.is_file():
                    raise DatasetError(f"missing mask {mask} for anomalous image {p}")
                expected[mask.name] = mask
            for mask in list_images(mask_dir, "mask folder"):
                if mask.name not in expected:
                    raise DatasetError(f"mask {mask} has no matching image in {defect_dir}")
            samples += [AnomalySample(p, mask_dir / f"{p.stem}_mask.png", 1, defect_dir.name)
                        for p in images]
        return samples
