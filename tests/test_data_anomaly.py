"""Anomaly-detection datasets: MVTec AD / VisA loaders on small fake trees written here (good and
malformed), and the offline texture dataset (determinism, exact masks, disjoint train/test)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geokernels.data import (TEXTURE_DEFECT_TYPES, DatasetError, MVTecAD,
                             TextureAnomalyDataset, VisA, texture_categories)
from geokernels.data.textures import _photo, split_rows

H, W = 20, 24          # native size of the fake images (deliberately not square)


def write_png(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def random_rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def rect_mask(value: int = 255, h: int = H, w: int = W) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[4:9, 6:15] = value
    return mask


# --------------------------------------------------------------------------------------------
# MVTec AD
# --------------------------------------------------------------------------------------------
def make_mvtec(root: Path, category: str = "widget", defects=(("crack", 2), ("hole", 1)),
               n_train: int = 3, n_good: int = 2) -> dict:
    base = root / category
    written = {}
    for i in range(n_train):
        written[f"train/good/{i:03d}"] = write_png(base / "train" / "good" / f"{i:03d}.png",
                                                   random_rgb(i))
    for i in range(n_good):
        write_png(base / "test" / "good" / f"{i:03d}.png", random_rgb(100 + i))
    for d, (defect, n) in enumerate(defects):
        for i in range(n):
            write_png(base / "test" / defect / f"{i:03d}.png", random_rgb(200 + 10 * d + i))
            written[f"mask/{defect}/{i:03d}"] = write_png(
                base / "ground_truth" / defect / f"{i:03d}_mask.png", rect_mask())
    return written


def test_mvtec_train_and_test_items(tmp_path):
    written = make_mvtec(tmp_path)
    train = MVTecAD(tmp_path, "widget", "train", size=16)
    assert len(train) == 3 and train.labels == [0, 0, 0] and train.defects == ["good"] * 3
    item = train[1]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 16, 16) and not item["mask"].any()
    assert item["label"] == 0 and item["defect"] == "good" and item["path"].endswith("001.png")

    test = MVTecAD(tmp_path, "widget", "test", size=None)
    assert len(test) == 5
    assert test.defects == ["crack", "crack", "good", "good", "hole"]        # sorted folders
    assert test.labels == [1, 1, 0, 0, 1]
    assert test.defect_types == ["crack", "good", "hole"]
    crack = test[0]
    # native size: pixels exact, mask exactly the written 0/255 mask as 0/1
    expected = torch.from_numpy(random_rgb(200).transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.equal(crack["image"], expected)
    assert torch.equal(crack["mask"][0], torch.from_numpy(written["mask/crack/000"] / 255.0).float())
    assert test[2]["mask"].shape == (1, H, W) and not test[2]["mask"].any()

    resized = MVTecAD(tmp_path, "widget", "test", size=12)[0]
    assert set(resized["mask"].unique().tolist()) == {0.0, 1.0}                 # still binary
    assert MVTecAD.available_categories(tmp_path) == ["widget"]


def test_mvtec_grayscale_and_dataloader(tmp_path):
    make_mvtec(tmp_path, n_train=2)
    gray = np.random.default_rng(0).integers(0, 256, (H, W), dtype=np.uint8)
    write_png(tmp_path / "widget" / "train" / "good" / "000.png", gray)
    item = MVTecAD(tmp_path, "widget", "train", size=None)[0]
    assert torch.equal(item["image"][0], item["image"][2])
    assert torch.equal(item["image"][1], torch.from_numpy(gray / 255.0).float())
    loader = torch.utils.data.DataLoader(MVTecAD(tmp_path, "widget", "test", size=8), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["mask"].shape == (4, 1, 8, 8)
    assert batch["label"].tolist() == [1, 1, 0, 0]


def test_mvtec_ignores_hidden_files(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "widget" / "test" / "crack" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "LICENSE.txt").write_text("license")
    from geokernels.data._io import DatasetWarning

    with pytest.warns(DatasetWarning, match=r"ignored 1 hidden entry .*\.DS_Store"):
        assert len(MVTecAD(tmp_path, "widget", "test")) == 5


def test_mvtec_missing_root_and_category(tmp_path):
    with pytest.raises(FileNotFoundError, match="MVTec AD root .*nowhere"):
        MVTecAD(tmp_path / "nowhere", "widget", "test")
    make_mvtec(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"gadget does not exist.*\['widget'\]"):
        MVTecAD(tmp_path, "gadget", "test")
    with pytest.raises(ValueError, match="split must be one of"):
        MVTecAD(tmp_path, "widget", "val")
    with pytest.raises(ValueError, match="size must be"):
        MVTecAD(tmp_path, "widget", "test", size=0)


def test_mvtec_missing_mask(tmp_path):
    make_mvtec(tmp_path)
    missing = tmp_path / "widget" / "ground_truth" / "crack" / "001_mask.png"
    missing.unlink()
    with pytest.raises(DatasetError, match=f"missing mask {missing}"):
        MVTecAD(tmp_path, "widget", "test")


def test_mvtec_missing_ground_truth_folders(tmp_path):
    make_mvtec(tmp_path)
    for p in (tmp_path / "widget" / "ground_truth" / "hole").iterdir():
        p.unlink()
    (tmp_path / "widget" / "ground_truth" / "hole").rmdir()
    with pytest.raises(DatasetError, match="missing mask folder .*hole"):
        MVTecAD(tmp_path, "widget", "test")
    # train split does not need ground truth
    assert len(MVTecAD(tmp_path, "widget", "train")) == 3


def test_mvtec_orphan_masks_and_folders(tmp_path):
    make_mvtec(tmp_path)
    write_png(tmp_path / "widget" / "ground_truth" / "crack" / "007_mask.png", rect_mask())
    with pytest.raises(DatasetError, match="007_mask.png has no matching image"):
        MVTecAD(tmp_path, "widget", "test")
    (tmp_path / "widget" / "ground_truth" / "crack" / "007_mask.png").unlink()
    write_png(tmp_path / "widget" / "ground_truth" / "stain" / "000_mask.png", rect_mask())
    with pytest.raises(DatasetError, match="stain has no matching test folder"):
        MVTecAD(tmp_path, "widget", "test")


def test_mvtec_empty_and_stray(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "widget" / "test" / "crack" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="unexpected entry .*notes.txt"):
        MVTecAD(tmp_path, "widget", "test")
    for p in (tmp_path / "widget" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="train folder .*good contains no images"):
        MVTecAD(tmp_path, "widget", "train")
    (tmp_path / "widget" / "train" / "bad").mkdir()
    with pytest.raises(DatasetError, match="must contain only 'good'"):
        MVTecAD(tmp_path, "widget", "train")


def test_mvtec_mask_size_mismatch_and_unreadable(tmp_path):
    make_mvtec(tmp_path)
    bad_mask = tmp_path / "widget" / "ground_truth" / "crack" / "000_mask.png"
    write_png(bad_mask, rect_mask(h=H + 2))
    test = MVTecAD(tmp_path, "widget", "test", size=16)     # building is cheap: no decoding
    with pytest.raises(DatasetError, match=f"mask {bad_mask} has size .* image .*000.png"):
        test[0]
    with pytest.raises(DatasetError, match="000_mask.png"):
        test.verify()
    broken = tmp_path / "widget" / "test" / "good" / "001.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=f"cannot read image {broken}"):
        MVTecAD(tmp_path, "widget", "test", size=16)[3]
    truncated = tmp_path / "widget" / "train" / "good" / "002.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DatasetError, match=f"cannot read image {truncated}"):
        MVTecAD(tmp_path, "widget", "train").verify()


# --------------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------------
def smooth_rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A smooth colour ramp: JPEG keeps it close (random noise would not survive JPEG)."""
    a, b, c = np.random.default_rng(seed).uniform(0, 1, 3)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([a * 0.5 + 0.5 * yy, b * 0.5 + 0.5 * xx, c * 0.5 + 0.25 * (xx + yy)], axis=2)
    return (rgb * 255).round().astype(np.uint8)


def write_jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def make_visa(root: Path, category: str = "candle", n_train: int = 3, n_test_normal: int = 2,
              n_anomaly: int = 2, anno: bool = True, extra_rows=(), columns=None) -> Path:
    rows = []
    base = f"{category}/Data"
    for i in range(n_train + n_test_normal):
        rel = f"{base}/Images/Normal/{i:04d}.JPG"
        write_jpg(root / rel, smooth_rgb(i))
        rows.append([category, "train" if i < n_train else "test", "normal", rel, ""])
    anno_rows = []
    for i in range(n_anomaly):
        rel = f"{base}/Images/Anomaly/{i:03d}.JPG"
        mask_rel = f"{base}/Masks/Anomaly/{i:03d}.png"
        write_jpg(root / rel, smooth_rgb(50 + i))
        write_png(root / mask_rel, rect_mask(value=i + 1))      # VisA masks hold defect ids
        rows.append([category, "test", "anomaly", rel, mask_rel])
        anno_rows.append([rel, "chunk of wax missing" if i == 0 else "wick too long", mask_rel])
    rows += [list(r) for r in extra_rows]
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns or ["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    if anno:
        with open(root / category / "image_anno.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "label", "mask"])
            writer.writerows(anno_rows)
    return csv_path


def test_visa_items(tmp_path):
    make_visa(tmp_path)
    train = VisA(tmp_path, "candle", "train", size=16)
    assert len(train) == 3 and train.labels == [0, 0, 0]
    item = train[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert not item["mask"].any() and item["defect"] == "good"

    test = VisA(tmp_path, "candle", "test", size=None)
    assert test.labels == [0, 0, 1, 1]
    assert test.defects == ["good", "good", "chunk of wax missing", "wick too long"]
    anomaly = test[3]
    # the mask holds defect id 2: any non-zero pixel is anomalous, exactly
    assert torch.equal(anomaly["mask"][0], torch.from_numpy(rect_mask(1)).float())
    assert anomaly["image"].shape == (3, H, W)
    # JPEG is lossy: close to the written pixels, not equal
    written = torch.from_numpy(smooth_rgb(51).transpose(2, 0, 1) / 255.0).float()
    assert (anomaly["image"] - written).abs().max() < 0.05
    assert VisA.available_categories(tmp_path) == ["candle"]


def test_visa_annotations_that_match_nothing_are_reported(tmp_path):
    """Every defect type silently became 'anomaly' when image_anno.csv wrote the image paths
    differently from 1cls.csv (per-defect metrics lost without a word)."""
    make_visa(tmp_path)
    anno = tmp_path / "candle" / "image_anno.csv"
    anno.write_text(anno.read_text().replace("candle/Data/", "./candle/Data/"))
    with pytest.warns(UserWarning, match="image_anno.csv names none of the 2 anomalous images"):
        test = VisA(tmp_path, "candle", "test", size=8)
    assert test.defects == ["good", "good", "anomaly", "anomaly"]


def test_visa_without_annotations_and_custom_split_file(tmp_path):
    csv_path = make_visa(tmp_path, anno=False)
    custom = tmp_path / "my_split.csv"
    custom.write_bytes(csv_path.read_bytes())
    csv_path.unlink()
    test = VisA(tmp_path, "candle", "test", size=8, split_csv=custom)
    assert test.defects == ["good", "good", "anomaly", "anomaly"]


def test_visa_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="VisA root"):
        VisA(tmp_path / "nowhere", "candle", "test")
    with pytest.raises(FileNotFoundError, match="split file .*1cls.csv does not exist"):
        VisA(tmp_path, "candle", "test")
    make_visa(tmp_path)
    with pytest.raises(DatasetError, match=r"'pcb1' does not appear .*\['candle'\]"):
        VisA(tmp_path, "pcb1", "test")
    mask = tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "001.png"
    mask.unlink()
    with pytest.raises(DatasetError, match=f"line 8: mask file {mask}"):
        VisA(tmp_path, "candle", "test")
    assert len(VisA(tmp_path, "candle", "train")) == 3           # train rows are fine
    image = tmp_path / "candle" / "Data" / "Images" / "Normal" / "0001.JPG"
    image.unlink()
    with pytest.raises(DatasetError, match=f"line 3: image file {image} does not exist"):
        VisA(tmp_path, "candle", "train")


def test_visa_category_folder_missing(tmp_path):
    make_visa(tmp_path, anno=False)
    (tmp_path / "candle").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="category folder .*candle does not exist"):
        VisA(tmp_path, "candle", "test")


@pytest.mark.parametrize("row, message", [
    (["candle", "test", "anomaly", "candle/Data/Images/Normal/0000.JPG", ""], "has no mask path"),
    (["candle", "test", "broken", "candle/Data/Images/Normal/0000.JPG", ""], "label must be"),
    (["candle", "val", "normal", "candle/Data/Images/Normal/0000.JPG", ""], "split must be"),
    (["candle", "test", "normal", "candle/Data/Images/Normal/0000.JPG", "m.png"], "lists a mask"),
    (["candle", "test", "normal", "", ""], "empty image path"),
    (["candle", "test", "normal", "a.JPG", "", "extra"], "too many fields"),
])
def test_visa_malformed_rows(tmp_path, row, message):
    csv_path = make_visa(tmp_path, extra_rows=[row])
    with pytest.raises(DatasetError, match=f"{csv_path} line 9: "):
        VisA(tmp_path, "candle", "test")
    with pytest.raises(DatasetError, match=message):
        VisA(tmp_path, "candle", "test")


def test_visa_malformed_csv_and_empty_split(tmp_path):
    make_visa(tmp_path, columns=["object", "split", "label", "image", "maskpath"])
    with pytest.raises(DatasetError, match=r"1cls.csv lacks column\(s\) \['mask'\]"):
        VisA(tmp_path, "candle", "test")
    make_visa(tmp_path, n_anomaly=0, n_test_normal=0)
    with pytest.raises(DatasetError, match="lists no 'test' images for 'candle'"):
        VisA(tmp_path, "candle", "test")
    (tmp_path / "split_csv" / "1cls.csv").write_bytes(b"\xff\xfe\x00garbage\x00\xff")
    with pytest.raises(DatasetError, match="1cls.csv"):
        VisA(tmp_path, "candle", "test")


def test_visa_mask_size_mismatch(tmp_path):
    make_visa(tmp_path)
    mask = tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    write_png(mask, rect_mask(w=W - 4))
    test = VisA(tmp_path, "candle", "test")
    with pytest.raises(DatasetError, match=f"mask {mask} has size 20x20 .* 24x20"):
        test[2]


# --------------------------------------------------------------------------------------------
# offline texture dataset
# --------------------------------------------------------------------------------------------
def test_texture_categories_are_real_photos():
    assert {"brick", "grass", "gravel"} <= set(texture_categories())
    for category in texture_categories():
        photo = _photo(category)
        assert photo.ndim == 2 and photo.shape[0] >= 480 and photo.std() > 0.05


def test_texture_items_shapes_and_labels():
    test = TextureAnomalyDataset("grass", "test", size=32, crop_size=64, num_test_good=4,
                                 num_test_defective=6)
    assert len(test) == 10
    assert test.labels == [0] * 4 + [1] * 6
    assert test.defects[4:] == list(TEXTURE_DEFECT_TYPES) * 2
    for i in range(len(test)):
        item = test[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 32, 32) and item["mask"].dtype == torch.float32
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert bool(item["mask"].any()) == bool(item["label"])
        assert item["defect"] == test.defects[i] and item["path"].startswith("skimage:grass/test/")
    assert torch.equal(test[-1]["image"], test[9]["image"])
    train = TextureAnomalyDataset("brick", "train", size=16, crop_size=16, num_train=5)
    assert len(train) == 5 and train.labels == [0] * 5 and not train[0]["mask"].any()


def test_texture_defects_in_equal_shares():
    test = TextureAnomalyDataset("gravel", "test")
    shares = {d: test.defects.count(d) for d in TEXTURE_DEFECT_TYPES}
    assert shares == {d: 20 for d in TEXTURE_DEFECT_TYPES} and test.defects.count("good") == 60
    uneven = TextureAnomalyDataset("gravel", "test", num_test_defective=7)
    assert sorted(uneven.defects.count(d) for d in TEXTURE_DEFECT_TYPES) == [2, 2, 3]


def test_texture_deterministic_by_seed_and_order_free():
    a = TextureAnomalyDataset("brick", "test", size=48, crop_size=96, seed=3)
    b = TextureAnomalyDataset("brick", "test", size=48, crop_size=96, seed=3)
    c = TextureAnomalyDataset("brick", "test", size=48, crop_size=96, seed=4)
    indices = [0, 61, 62, 63, 119]
    later = [b[i] for i in reversed(indices)][::-1]              # other access order
    for i, item_b in zip(indices, later):
        item_a = a[i]
        assert torch.equal(item_a["image"], item_b["image"])
        assert torch.equal(item_a["mask"], item_b["mask"])
        assert item_a["path"] == item_b["path"]
    assert not torch.equal(a[62]["image"], c[62]["image"])
    assert not torch.equal(a[62]["mask"], c[62]["mask"])


@pytest.mark.parametrize("category", ["brick", "grass", "gravel"])
def test_texture_masks_are_exact(category):
    test = TextureAnomalyDataset(category, "test", size=64, crop_size=128, num_test_good=2,
                                 num_test_defective=12, seed=1)
    for i in range(len(test)):
        item, clean = test.generate(i)
        mask = item["mask"][0].bool()
        changed = (item["image"] != clean).any(0)
        assert not changed[~mask].any(), f"{item['path']}: pixels changed outside the mask"
        if item["label"] == 0:
            assert not mask.any() and torch.equal(item["image"], clean)
            continue
        assert mask.sum() >= 4, item["path"]
        # every masked pixel was painted; an unchanged one could only be a blend coincidence
        assert changed[mask].float().mean() >= 0.99, item["path"]


def test_texture_foreign_source_names_the_pasted_photo(monkeypatch):
    import geokernels.data.textures as tx

    read = []                       # every photo generate() reads; the last is the pasted one
    monkeypatch.setattr(tx, "_photo", lambda c, _photo=tx._photo: read.append(c) or _photo(c))
    test = TextureAnomalyDataset("gravel", "test", size=32, crop_size=64, num_test_good=2,
                                 num_test_defective=30)
    seen = set()
    for i, defect in enumerate(test.defects):
        read.clear()
        test.generate(i)
        photos = list(read)
        source = test.foreign_source(i)
        if defect != "foreign_texture":
            assert source is None and photos == ["gravel"]
            continue
        assert source == photos[-1] and source in texture_categories() and source != "gravel"
        seen.add(source)
    assert seen == {"brick", "grass"}     # both other photos among the ten patches


def test_texture_train_and_test_regions_are_disjoint():
    for category in texture_categories():
        photo = _photo(category)
        rows = split_rows(photo.shape[0])
        assert rows["train"][1] < rows["test"][0]                 # guard band between
        train = TextureAnomalyDataset(category, "train", size=64, crop_size=64, num_train=50)
        test = TextureAnomalyDataset(category, "test", size=64, crop_size=64)
        train_boxes = [train.crop_box(i) for i in range(len(train))]
        test_boxes = [test.crop_box(i) for i in range(len(test))]
        assert max(b[2] for b in train_boxes) <= rows["train"][1]
        assert min(b[0] for b in test_boxes) >= rows["test"][0]
        assert max(b[2] for b in test_boxes) <= photo.shape[0]
        # the boxes are the true crops: the normal images are exactly those photo pixels
        for ds, boxes in ((train, train_boxes), (test, test_boxes)):
            top, left, bottom, right = boxes[1]
            assert torch.equal(ds[1]["image"][0], torch.from_numpy(photo[top:bottom, left:right].copy()))


def test_texture_bad_arguments():
    with pytest.raises(ValueError, match="category must be one of"):
        TextureAnomalyDataset("marble")
    with pytest.raises(ValueError, match="split must be one of"):
        TextureAnomalyDataset("brick", "val")
    with pytest.raises(ValueError, match="crop_size must be <= 160"):
        TextureAnomalyDataset("brick", "test", crop_size=200)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        TextureAnomalyDataset("brick", seed=-1)
    with pytest.raises(ValueError, match="size must be an int"):
        TextureAnomalyDataset("brick", size=2.5)
    with pytest.raises(ValueError, match="num_test_good"):
        TextureAnomalyDataset("brick", "test", num_test_good=0, num_test_defective=0)
    ds = TextureAnomalyDataset("brick", "train", num_train=2)
    with pytest.raises(IndexError, match="index 2 out of range"):
        ds[2]
    with pytest.raises(TypeError, match="index must be an int"):
        ds[0.5]
