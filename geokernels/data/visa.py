"""VisA loader (Zou et al., ECCV 2022), official layout with the one-class split file:

```
<root>/split_csv/1cls.csv                       columns: object,split,label,image,mask
<root>/<category>/Data/Images/Normal/*.JPG
<root>/<category>/Data/Images/Anomaly/*.JPG
<root>/<category>/Data/Masks/Anomaly/*.png
<root>/<category>/image_anno.csv                (optional: per-image defect descriptions)
```
Paths in the CSV files are relative to ``<root>``. ``label`` is "normal" or "anomaly";
``mask`` is empty for normal images.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path

from geokernels.data._io import (AnomalySample, DatasetError, SampleListDataset, check_size,
                                 check_split, require_dir)

VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
                   "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
_SPLIT_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """Rows of a CSV file as (line number, dict); missing columns are an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in columns]
            if missing:
                raise DatasetError(f"{path} lacks column(s) {missing}; found {columns}, "
                                   f"expected {list(required)}")
            rows = []
            for row in reader:
                if None in row:                             # more fields than columns
                    raise DatasetError(f"{path} line {reader.line_num}: too many fields")
                rows.append((reader.line_num,
                             {k.strip(): (v or "").strip() for k, v in row.items()}))
            return rows
    except UnicodeDecodeError as e:
        raise DatasetError(f"cannot read {path} as UTF-8 text: {e}") from None
    except csv.Error as e:
        raise DatasetError(f"malformed CSV {path}: {e}") from None


class VisA(SampleListDataset):
    """One category and split of VisA following the official 1-class split (``1cls.csv``).

    Args:
        root: the VisA folder (holding ``split_csv/`` and the category folders).
        category: e.g. "candle" (see :data:`VISA_CATEGORIES`); must appear in the split file.
        split: "train" or "test".
        size: images and masks are resized to (size, size) (aspect ratio not kept, as in the
            usual VisA protocol); None keeps the native resolution.
        split_csv: another split file with the same columns (default ``root/split_csv/1cls.csv``).

    Items are dicts as in :class:`~geokernels.data.MVTecAD`: ``image`` (3, size, size) in [0, 1],
    ``mask`` (1, size, size) 0/1 (any non-zero mask pixel is anomalous), ``label`` 0/1, ``path``,
    ``defect`` ("good" for normal images; else the description from ``<category>/image_anno.csv``
    when that file is present, otherwise "anomaly").

    Checked when built: split file present and well-formed (columns, split/label values, masks
    given exactly for anomalous rows), category present in it and on disk, every listed image
    and mask file exists, the split not empty -- errors name the file and CSV line. Decoding
    errors and mask/image size mismatches are raised in ``__getitem__`` (or :meth:`verify`).
    """

    def __init__(self, root, category: str, split: str = "test", size: int | None = 256,
                 split_csv=None):
        self.root = Path(root)
        self.category = category
        self.split = check_split(split)
        self.size = check_size(size)
        if not isinstance(category, str) or not category:
            raise ValueError(f"category must be a non-empty string, got {category!r}")
        require_dir(self.root, "VisA root")
        self.split_csv = Path(split_csv) if split_csv is not None else (
            self.root / "split_csv" / "1cls.csv")
        rows = _read_csv(self.split_csv, _SPLIT_COLUMNS)
        objects = sorted({row["object"] for _, row in rows})
        if category not in objects:
            raise DatasetError(f"category {category!r} does not appear in {self.split_csv}; "
                               f"categories there: {objects}")
        require_dir(self.root / category, "category folder")
        defects = self._defect_descriptions()
        self.samples = []
        for line, row in rows:
            if row["object"] != category:
                continue
            where = f"{self.split_csv} line {line}"
            if row["split"] not in ("train", "test"):
                raise DatasetError(f"{where}: split must be 'train' or 'test', got {row['split']!r}")
            if row["split"] != self.split:
                continue
            if row["label"] not in _LABELS:
                raise DatasetError(f"{where}: label must be 'normal' or 'anomaly', "
                                   f"got {row['label']!r}")
            label = _LABELS[row["label"]]
            if not row["image"]:
                raise DatasetError(f"{where}: empty image path")
            image = self.root / row["image"]
            if not image.is_file():
                raise DatasetError(f"{where}: image file {image} does not exist")
            mask = None
            if label == 1:
                if not row["mask"]:
                    raise DatasetError(f"{where}: anomalous image {image} has no mask path")
                mask = self.root / row["mask"]
                if not mask.is_file():
                    raise DatasetError(f"{where}: mask file {mask} for {image} does not exist")
            elif row["mask"]:
                raise DatasetError(f"{where}: normal image {image} lists a mask {row['mask']!r}")
            defect = "good" if label == 0 else defects.get(row["image"], "anomaly")
            self.samples.append(AnomalySample(image, mask, label, defect))
        if not self.samples:
            raise DatasetError(f"{self.split_csv} lists no {self.split!r} images for {category!r}")
        anomalous = [s for s in self.samples if s.label == 1]
        if defects and anomalous and all(s.defect == "anomaly" for s in anomalous):
            warnings.warn(f"{self.root / category / 'image_anno.csv'} names none of the "
                          f"{len(anomalous)} anomalous images of {self.split_csv} (its 'image' "
                          f"paths are written differently?): their defect type is reported as "
                          f"'anomaly'", stacklevel=2)

    def _defect_descriptions(self) -> dict[str, str]:
        anno = self.root / self.category / "image_anno.csv"
        if not anno.exists():
            return {}
        return {row["image"]: row["label"] for _, row in _read_csv(anno, ("image", "label"))
                if row["label"] and row["label"] != "normal"}

    @staticmethod
    def available_categories(root, split_csv=None) -> list[str]:
        path = Path(split_csv) if split_csv is not None else Path(root) / "split_csv" / "1cls.csv"
        return sorted({row["object"] for _, row in _read_csv(path, _SPLIT_COLUMNS)})
