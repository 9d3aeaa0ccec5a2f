"""Malformed dataset trees (issue 8): every defect is an error naming the file, or -- for entries
that are ignored by design (hidden files, non-image files) -- a warning that counts them.

Table-driven: each case breaks one thing in a small valid tree written to tmp_path, and says
when the error must come (building the dataset, or decoding: ``verify()`` / ``ds[i]``) and which
path the message must name.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geokernels.data import DatasetError, MVTecAD, SegmentationFolder, VisA
from geokernels.data._io import DatasetWarning
from tests.test_data_anomaly import H, W, make_mvtec, make_visa, rect_mask, write_png


def _truncate(path: Path, keep: int | None = None):
    """Cut the file (default: to half its size, at least the 40-byte PNG header + IHDR)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep if keep is not None else max(40, len(data) // 2)])


def _mode_i(path: Path):  # a 32-bit integer image (TIFF): not an 8/16-bit photo
    Image.fromarray(np.zeros((H, W), np.int32)).save(path)


# ---- MVTec AD --------------------------------------------------------------------------------
# (id, break(root) -> path the message must name, split, stage, exception)
MVTEC_CASES = [
    ("missing_mask", lambda r: _unlink(r / "widget/ground_truth/crack/001_mask.png"),
     "test", "build", DatasetError),
    ("orphan_mask", lambda r: _write(r / "widget/ground_truth/crack/007_mask.png", rect_mask()),
     "test", "build", DatasetError),
    ("orphan_mask_folder", lambda r: _write(r / "widget/ground_truth/dent/000_mask.png",
                                            rect_mask()).parent, "test", "build", DatasetError),
    ("missing_ground_truth", lambda r: _rmtree(r / "widget/ground_truth"), "test", "build",
     FileNotFoundError),
    ("mask_size_mismatch", lambda r: _write(r / "widget/ground_truth/hole/000_mask.png",
                                            rect_mask(h=H - 3)), "test", "decode", DatasetError),
    ("mask_unreadable", lambda r: _bytes(r / "widget/ground_truth/hole/000_mask.png", b"xx"),
     "test", "decode", DatasetError),
    ("image_zero_bytes", lambda r: _bytes(r / "widget/test/good/001.png", b""), "test", "decode",
     DatasetError),
    ("image_truncated", lambda r: _trunc(r / "widget/train/good/002.png"), "train", "decode",
     DatasetError),
    ("image_not_an_image", lambda r: _bytes(r / "widget/train/good/000.png", b"<html>"),
     "train", "decode", DatasetError),
    ("image_32bit", lambda r: _call(_mode_i, r / "widget/train/good/003.tif"), "train", "decode",
     DatasetError),
    ("folder_named_like_image", lambda r: _mkdir(r / "widget/train/good/009.png"), "train",
     "build", DatasetError),
    ("broken_symlink", lambda r: _symlink(r / "widget/test/good/005.png", r / "nowhere.png"),
     "test", "build", DatasetError),
    ("stray_file_in_test", lambda r: _bytes(r / "widget/test/readme.txt", b"hi"), "test",
     "build", DatasetError),
    ("non_image_in_train", lambda r: _bytes(r / "widget/train/good/notes.txt", b"hi"), "train",
     "build", DatasetError),
    ("extra_train_folder", lambda r: _write(r / "widget/train/bad/000.png", rect_mask()).parent,
     "train", "build", DatasetError),
    ("empty_train_category", lambda r: _empty(r / "widget/train/good"), "train", "build",
     DatasetError),
    ("empty_defect_folder", lambda r: _empty(r / "widget/test/hole"), "test", "build",
     DatasetError),
    ("no_defect_folders", lambda r: _empty(r / "widget/test"), "test", "build", DatasetError),
    ("missing_test_folder", lambda r: _rmtree(r / "widget/test"), "test", "build",
     FileNotFoundError),
]


def _unlink(p: Path) -> Path:
    p.unlink()
    return p


def _write(p: Path, array) -> Path:
    write_png(p, array)
    return p


def _bytes(p: Path, data: bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _trunc(p: Path) -> Path:
    _truncate(p)
    return p


def _call(fn, p: Path) -> Path:
    fn(p)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


def _symlink(p: Path, target: Path) -> Path:
    p.symlink_to(target)
    return p


def _rmtree(p: Path) -> Path:
    import shutil

    shutil.rmtree(p)
    return p


def _empty(p: Path) -> Path:
    import shutil

    shutil.rmtree(p)
    p.mkdir()
    return p


def _expect(build, stage, exc, path: Path):
    pattern = re.escape(str(path))
    if stage == "build":
        with pytest.raises(exc, match=pattern):
            build()
        return
    ds = build()  # building does not decode: the tree itself is fine
    with pytest.raises(exc, match=pattern):
        ds.verify()
    # item access raises the same error for the bad item, and no item is skipped
    bad = [i for i in range(len(ds)) if _raises(ds, i, exc)]
    assert len(bad) == 1, bad


def _raises(ds, i, exc) -> bool:
    try:
        ds[i]
    except exc:
        return True
    return False


@pytest.mark.parametrize("case", MVTEC_CASES, ids=[c[0] for c in MVTEC_CASES])
def test_mvtec_malformed(tmp_path, case):
    _, breaker, split, stage, exc = case
    make_mvtec(tmp_path)
    path = breaker(tmp_path)
    _expect(lambda: MVTecAD(tmp_path, "widget", split, size=16), stage, exc, path)


def test_mvtec_hidden_entries_are_counted_not_silent(tmp_path):
    make_mvtec(tmp_path)
    for name in (".DS_Store", "._000.png"):
        (tmp_path / "widget" / "test" / "crack" / name).write_bytes(b"\0")
    with pytest.warns(DatasetWarning, match=r"ignored 2 hidden entries .*crack"):
        ds = MVTecAD(tmp_path, "widget", "test")
    assert len(ds) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean tree warns about nothing
        MVTecAD(tmp_path, "widget", "train")


def test_mvtec_empty_category_folder(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "gadget").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gadget" / "train"))):
        MVTecAD(tmp_path, "gadget", "train")
    assert MVTecAD.available_categories(tmp_path) == ["widget"]


# ---- VisA ------------------------------------------------------------------------------------
_BASE = "candle/Data"
VISA_CASES = [
    ("missing_image", lambda r: _unlink(r / f"{_BASE}/Images/Normal/0001.JPG"), "train", "build",
     DatasetError),
    ("missing_mask", lambda r: _unlink(r / f"{_BASE}/Masks/Anomaly/001.png"), "test", "build",
     DatasetError),
    ("mask_size_mismatch", lambda r: _write(r / f"{_BASE}/Masks/Anomaly/000.png",
                                            rect_mask(w=W + 4)), "test", "decode", DatasetError),
    ("mask_zero_bytes", lambda r: _bytes(r / f"{_BASE}/Masks/Anomaly/001.png", b""), "test",
     "decode", DatasetError),
    ("image_truncated", lambda r: _trunc(r / f"{_BASE}/Images/Normal/0000.JPG"), "train",
     "decode", DatasetError),
    ("image_not_an_image", lambda r: _bytes(r / f"{_BASE}/Images/Anomaly/000.JPG", b"GIF8"),
     "test", "decode", DatasetError),
    ("image_is_a_folder", lambda r: _replace_with_dir(r / f"{_BASE}/Images/Normal/0002.JPG"),
     "train", "build", DatasetError),
    ("split_file_missing", lambda r: _unlink(r / "split_csv/1cls.csv"), "train", "build",
     FileNotFoundError),
    ("split_file_not_utf8", lambda r: _bytes(r / "split_csv/1cls.csv", b"object,\xff\xfe\n"),
     "train", "build", DatasetError),
    ("split_file_no_columns", lambda r: _bytes(r / "split_csv/1cls.csv", b""), "train", "build",
     DatasetError),
    ("anno_file_broken", lambda r: _bytes(r / "candle/image_anno.csv", b"foo,bar\n1,2\n"),
     "test", "build", DatasetError),
]


def _replace_with_dir(p: Path) -> Path:
    p.unlink()
    p.mkdir()
    return p


@pytest.mark.parametrize("case", VISA_CASES, ids=[c[0] for c in VISA_CASES])
def test_visa_malformed(tmp_path, case):
    _, breaker, split, stage, exc = case
    make_visa(tmp_path)
    path = breaker(tmp_path)
    _expect(lambda: VisA(tmp_path, "candle", split, size=16), stage, exc, path)


def test_visa_empty_category(tmp_path):
    """A category listed only for one split: the other split is empty -> error naming the file."""
    csv_path = make_visa(tmp_path, n_test_normal=0, n_anomaly=0)
    with pytest.raises(DatasetError, match=re.escape(str(csv_path)) + ".*no 'test' images"):
        VisA(tmp_path, "candle", "test")
    assert len(VisA(tmp_path, "candle", "train")) == 3


# ---- user folders (segmentation) -------------------------------------------------------------
def _seg_tree(root: Path, n: int = 3):
    for i in range(n):
        write_png(root / "images" / f"{i}.png", (np.random.default_rng(i).random((8, 9)) * 255)
                  .astype(np.uint8))
        write_png(root / "masks" / f"{i}.png", (rect_mask(h=8, w=9) > 0).astype(np.uint8) * 255)


def test_folder_skipped_entries_are_counted(tmp_path):
    _seg_tree(tmp_path)
    (tmp_path / "images" / "notes.txt").write_text("x")
    (tmp_path / "images" / "sub.png").mkdir()
    with pytest.warns(UserWarning, match=r"skipped 2 non-image entries .*images"):
        ds = SegmentationFolder(tmp_path)
    assert len(ds) == 3


def test_folder_unmatched_suffix_masks_are_counted(tmp_path):
    _seg_tree(tmp_path)
    for i in range(3):
        (tmp_path / "masks" / f"{i}.png").rename(tmp_path / "masks" / f"{i}_gt.png")
    write_png(tmp_path / "masks" / "stray.png", np.zeros((8, 9), np.uint8))
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) .*masks.*'_gt'"):
        ds = SegmentationFolder(tmp_path, mask_suffix="_gt")
    assert len(ds) == 3


@pytest.mark.parametrize("which", ["images", "masks"])
def test_folder_unreadable_files_name_the_file(tmp_path, which):
    _seg_tree(tmp_path)
    bad = tmp_path / which / "1.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        SegmentationFolder(tmp_path)


@pytest.mark.parametrize("which", ["images", "masks"])
def test_folder_truncated_files_name_the_file(tmp_path, which):
    _seg_tree(tmp_path)
    bad = tmp_path / which / "2.png"
    _truncate(bad)  # the header survives: the error comes when the item is read
    try:
        ds = SegmentationFolder(tmp_path)
    except ValueError as exc:
        assert str(bad) in str(exc)
        return
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        ds[2]


def test_folder_duplicate_stems_and_size_mismatch(tmp_path):
    _seg_tree(tmp_path)
    write_png(tmp_path / "images" / "1.jpg", np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="two images with the stem '1'"):
        SegmentationFolder(tmp_path)
    (tmp_path / "images" / "1.jpg").unlink()
    write_png(tmp_path / "masks" / "0.png", np.zeros((7, 9), np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "masks" / "0.png"))):
        SegmentationFolder(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16"])
def test_mask_modes_read_the_same_region(tmp_path, mode):
    # an opaque alpha channel made every pixel of an RGBA/LA mask anomalous; a palette mask
    # is read by its colours (index 0 may be any colour)
    from geokernels.data._io import load_mask

    region = np.zeros((8, 8), dtype=bool)
    region[2:4, 3:6] = True
    gray = (region * 255).astype(np.uint8)
    if mode == "P":
        img = Image.fromarray(gray).convert("P")
    elif mode == "I;16":
        img = Image.fromarray((region * 65535).astype(np.uint16))
    else:
        img = Image.fromarray(gray).convert(mode)
    path = tmp_path / f"m_{mode.replace(';', '')}.png"
    img.save(path)
    mask = load_mask(path, None, (8, 8), tmp_path / "image.png")
    assert torch.equal(mask[0].bool(), torch.from_numpy(region))
