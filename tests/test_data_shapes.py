"""Synthetic shapes dataset and the image/mask folder loader."""
import numpy as np
import pytest
import torch
from PIL import Image

from geokernels.data import SegmentationFolder, SyntheticShapes
from geokernels.data.shapes import KINDS
from geokernels.metrics import solidity


def test_items_shapes_ranges_and_exact_masks():
    ds = SyntheticShapes(length=12, size=(40, 56), seed=1, salt_pepper=0.02)
    assert len(ds) == 12
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape == (1, 40, 56) and mask.shape == (1, 40, 56)
        assert image.dtype == torch.float32 and mask.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        # the object lies inside the image, with a margin
        assert mask[..., 0, :].sum() == 0 and mask[..., -1, :].sum() == 0
        assert mask[..., :, 0].sum() == 0 and mask[..., :, -1].sum() == 0
    assert ds[-1][0].equal(ds[11][0])
    with pytest.raises(IndexError):
        ds[12]


def test_deterministic_by_seed_and_index():
    a = SyntheticShapes(length=5, size=32, seed=7)
    b = SyntheticShapes(length=5, size=32, seed=7)
    c = SyntheticShapes(length=5, size=32, seed=8)
    for i in range(5):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not torch.equal(a[0][1], a[1][1])
    assert any(not torch.equal(a[i][1], c[i][1]) for i in range(5))
    # the scene does not depend on the noise settings: only the noise changes
    quiet = SyntheticShapes(length=5, size=32, seed=7, noise_std=0.0)
    loud = SyntheticShapes(length=5, size=32, seed=7, noise_std=0.3, salt_pepper=0.1)
    for i in range(5):
        q, lo = quiet.render(i), loud.render(i)
        assert torch.equal(q["mask"], lo["mask"]) and torch.equal(q["clean"], lo["clean"])
        assert torch.equal(q["image"], q["clean"])
        assert (lo["image"] - lo["clean"]).abs().mean() > 0.05


def test_kinds_are_convex_or_near_convex():
    for kind in KINDS:
        ds = SyntheticShapes(length=8, size=64, seed=2, kinds=(kind,))
        masks = torch.stack([ds[i][1] for i in range(8)])
        assert all(ds.render(i)["kind"] == kind for i in range(8))
        sol = solidity(masks, reduction="none")
        # digitised convex shapes score ~0.92-0.98 under skimage's hull (an L-shape: ~0.6)
        assert (sol >= 0.9).all(), (kind, sol)
        assert (masks.flatten(1).sum(1) > 0.02 * 64 * 64).all()


def test_image_shows_object_and_noise_settings():
    ds = SyntheticShapes(length=6, size=48, seed=4, noise_std=0.0, occlusion_prob=0.0, clutter=0)
    for i in range(6):
        item = ds.render(i)
        inside = item["clean"][item["mask"] > 0].mean()
        outside = item["clean"][item["mask"] == 0].mean()
        assert abs(inside - outside) > 0.15  # the object is visible in a clean image
    sp = SyntheticShapes(length=2, size=64, seed=4, noise_std=0.0, salt_pepper=0.2, occlusion_prob=0.0)
    item = sp.render(0)
    changed = (item["image"] != item["clean"]).float().mean().item()
    assert 0.1 < changed < 0.3
    extremes = (item["image"] == 0) | (item["image"] == 1)
    assert extremes.float().mean() > 0.15


def test_occlusion_changes_image_not_mask():
    occ = SyntheticShapes(length=10, size=48, seed=9, occlusion_prob=1.0, noise_std=0.0, clutter=0)
    free = SyntheticShapes(length=10, size=48, seed=9, occlusion_prob=0.0, noise_std=0.0, clutter=0)
    diffs = 0
    for i in range(10):
        a, b = occ.render(i), free.render(i)
        assert torch.equal(a["mask"], b["mask"])
        diffs += int(not torch.equal(a["clean"], b["clean"]))
    assert diffs >= 8


@pytest.mark.parametrize("kwargs,exc,name", [
    ({"length": 0}, ValueError, "length"),
    ({"size": 8}, ValueError, "size"),
    ({"size": "big"}, TypeError, "size"),
    ({"seed": -1}, ValueError, "seed"),
    ({"kinds": ("square",)}, ValueError, "kinds"),
    ({"noise_std": -0.1}, ValueError, "noise_std"),
    ({"salt_pepper": (0.2, 0.1)}, ValueError, "salt_pepper"),
    ({"radius": 0.9}, ValueError, "radius"),
    ({"occlusion_prob": 1.5}, ValueError, "occlusion_prob"),
    ({"clutter": -1}, ValueError, "clutter"),
])
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        SyntheticShapes(**kwargs)


# ---- folder loader -----------------------------------------------------------------------------

def _write(folder, name, arr):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / name)


def _make_folder(tmp_path, n=3, H=12, W=15, mask_scale=255, suffix=""):
    rng = np.random.default_rng(0)
    for i in range(n):
        _write(tmp_path / "images", f"im{i}.png", (rng.random((H, W)) * 255).astype(np.uint8))
        m = np.zeros((H, W), np.uint8)
        m[2:8, 3 + i:10] = mask_scale
        _write(tmp_path / "masks", f"im{i}{suffix}.png", m)
    return tmp_path


def test_folder_loads_pairs(tmp_path):
    root = _make_folder(tmp_path)
    ds = SegmentationFolder(root)
    assert len(ds) == 3
    img, mask = ds[1]
    assert img.shape == (1, 12, 15) and mask.shape == (1, 12, 15)
    assert img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    expect = np.zeros((12, 15), np.float32)
    expect[2:8, 4:10] = 1
    assert np.array_equal(mask[0].numpy(), expect)
    raw = np.asarray(Image.open(root / "images" / "im1.png"), dtype=np.float32) / 255
    assert np.array_equal(img[0].numpy(), raw)
    rgb = SegmentationFolder(root, grayscale=False, size=(24, 20))
    img, mask = rgb[0]
    assert img.shape == (3, 24, 20) and mask.shape == (1, 24, 20)
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_folder_mask_suffix_and_01_masks(tmp_path):
    root = _make_folder(tmp_path, mask_scale=1, suffix="_mask")
    ds = SegmentationFolder(root, mask_suffix="_mask")
    assert ds[0][1].sum() == 6 * 7


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="image_dir"):
        SegmentationFolder(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="no images"):
        SegmentationFolder(tmp_path)
    _write(tmp_path / "images", "a.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(ValueError, match="no mask"):
        SegmentationFolder(tmp_path)
    _write(tmp_path / "masks", "a.png", np.zeros((5, 7), np.uint8))
    with pytest.raises(ValueError, match="size"):
        SegmentationFolder(tmp_path)
    soft = np.zeros((5, 6), np.uint8)
    soft[1, 1] = 128
    _write(tmp_path / "masks", "a.png", soft)
    ds = SegmentationFolder(tmp_path)
    with pytest.raises(ValueError, match="not binary"):
        ds[0]
    assert SegmentationFolder(tmp_path, threshold=100)[0][1].sum() == 1
    _write(tmp_path / "masks", "b.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(ValueError, match="no image"):
        SegmentationFolder(tmp_path)


def test_folder_16bit_and_float_images_keep_their_values(tmp_path):
    """16-bit PNGs and float TIFFs used to pass through convert("L"), which clipped/rounded every
    pixel to one value; they are scaled by 1/65535 or read as is (float in [0, 1])."""
    H, W = 10, 12
    grey = np.linspace(0.05, 0.95, H * W).reshape(H, W)
    mask = np.zeros((H, W), np.uint8)
    mask[2:7, 3:9] = 1
    deep = (grey * 65535).round().astype(np.uint16)
    _write(tmp_path / "images", "a.png", deep)
    Image.fromarray(grey.astype(np.float32), mode="F").save(tmp_path / "images" / "b.tif")
    _write(tmp_path / "masks", "a.png", mask * 255)
    Image.fromarray(mask.astype(np.uint16) * 65535).save(tmp_path / "masks" / "b.png")  # 16-bit
    ds = SegmentationFolder(tmp_path)
    a, ma = ds[0]
    b, mb = ds[1]
    np.testing.assert_allclose(a[0].numpy(), deep / 65535.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(b[0].numpy(), grey, rtol=0, atol=1e-7)
    assert torch.equal(ma, mb) and ma.sum() == 30
    small = SegmentationFolder(tmp_path, size=(5, 6), grayscale=False)[0][0]
    assert small.shape == (3, 5, 6) and 0.2 < float(small.std()) and small.min() >= 0
    # the same image as 8 bits, resized by Pillow: the float path agrees to 8-bit rounding
    ref = np.asarray(Image.fromarray((grey * 255).round().astype(np.uint8)).resize(
        (6, 5), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(small[0].numpy(), ref, atol=2.5 / 255)


def test_folder_rejects_images_of_unknown_scale(tmp_path):
    _write(tmp_path / "masks", "a.png", np.zeros((4, 5), np.uint8))
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((4, 5), 3000, np.int32), mode="I").save(tmp_path / "images" / "a.tif")
    with pytest.raises(ValueError, match="32-bit integer"):
        SegmentationFolder(tmp_path)[0]
    Image.fromarray(np.full((4, 5), 7.5, np.float32), mode="F").save(tmp_path / "images" / "a.tif")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        SegmentationFolder(tmp_path)[0]


def test_folder_palette_masks_by_index(tmp_path):
    """VOC-style palette masks hold indices {0, 1}; their luminance ({0, 38} here) is not them."""
    _write(tmp_path / "images", "a.png", np.zeros((6, 6), np.uint8))
    m = np.zeros((6, 6), np.uint8)
    m[1:4, 2:5] = 1
    pal = Image.fromarray(m, mode="P")
    pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    (tmp_path / "masks").mkdir()
    pal.save(tmp_path / "masks" / "a.png")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a VOC palette (index 0 black): no warning
        assert SegmentationFolder(tmp_path)[0][1].sum() == 9
    # a [white, black] palette with the object drawn in white (index 0): read by index it is
    # inverted, which used to happen silently
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    pal.save(tmp_path / "masks" / "a.png")
    ds = SegmentationFolder(tmp_path)
    with pytest.warns(UserWarning, match=r"index 0 is the colour \(255, 255, 255\)"):
        ds[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # said once per file
        ds[0]


def test_16bit_png_opened_as_mode_i_by_older_pillow(tmp_path, monkeypatch):
    """Older Pillow opens a 16-bit grayscale PNG as mode "I". The folder's fallback for it never
    fired (Image.copy() drops .format) and the anomaly loaders refused mode "I" outright, so both
    rejected ordinary 16-bit PNGs; they now share one decoder (data._io.deep_gray)."""
    from PIL import PngImagePlugin

    from geokernels.data._io import load_image

    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))   # the old mapping
    deep = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)
    _write(tmp_path / "images", "a.png", deep)
    _write(tmp_path / "masks", "a.png", (deep > 20000).astype(np.uint8) * 255)
    with Image.open(tmp_path / "images" / "a.png") as im:
        assert im.mode == "I"                       # the patch took effect
    image, mask = SegmentationFolder(tmp_path)[0]
    np.testing.assert_allclose(image[0].numpy(), deep / 65535.0, rtol=0, atol=1e-7)
    rgb, native = load_image(tmp_path / "images" / "a.png", None)
    assert native == (12, 16) and rgb.shape == (3, 12, 16)
    np.testing.assert_allclose(rgb[1].numpy(), deep / 65535.0, rtol=0, atol=1e-7)
