"""Segmentation metrics (SPEC.md 2.6): hand-computed cases and skimage/scipy transcriptions."""
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from skimage.measure import regionprops
from skimage.segmentation import find_boundaries

from geokernels.data import SyntheticShapes
from geokernels.metrics import boundary_distance, dice, hd95, inner_boundary, iou, solidity
from tests.test_distance import random_mask


def square(H, W, r0, r1, c0, c1):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


# ---- independent transcriptions (numpy / scipy / skimage) -------------------------------------

def np_boundary_distance(pred, gt):
    """SPEC 2.6 literally, with scipy's EDT and skimage's find_boundaries."""
    df = ndi.distance_transform_edt(gt) + ndi.distance_transform_edt(1 - gt)
    df[find_boundaries(gt, mode="inner")] = 0
    vals = df[find_boundaries(pred, mode="inner")]
    return vals.mean(), vals.std()


def np_hd95(pred, gt):
    """medpy.metric.binary.hd95, transcribed (medpy itself is not a dependency)."""
    fp = ndi.generate_binary_structure(2, 1)
    sp = pred ^ ndi.binary_erosion(pred, structure=fp, iterations=1)
    sg = gt ^ ndi.binary_erosion(gt, structure=fp, iterations=1)
    d1 = ndi.distance_transform_edt(~sg)[sp]
    d2 = ndi.distance_transform_edt(~sp)[sg]
    return np.percentile(np.hstack((d1, d2)), 95)


def blob_pairs(n=6, size=(37, 45)):
    ds = SyntheticShapes(n, size, seed=3, noise_std=0.0)
    out = []
    for i in range(n):
        gt = ds.render(i)["mask"][0].bool()
        # a plausible prediction: the mask shifted and eroded/dilated a little
        shift = torch.roll(gt, shifts=(i % 3 - 1, (i * 2) % 5 - 2), dims=(0, 1))
        pred = torch.from_numpy(ndi.binary_dilation(shift.numpy(), iterations=i % 2) if i % 2 else
                                ndi.binary_erosion(shift.numpy(), iterations=1))
        out.append((pred, gt))
    return out


# ---- Dice / IoU --------------------------------------------------------------------------------

def test_dice_iou_hand_cases():
    a = square(6, 6, 0, 2, 0, 3)  # 6 pixels
    b = square(6, 6, 1, 3, 0, 3)  # 6 pixels, 3 shared
    assert dice(a, b).item() == pytest.approx(2 * 3 / 12)
    assert iou(a, b).item() == pytest.approx(3 / 9)
    assert dice(a, a).item() == 1.0 and iou(a, a).item() == 1.0
    empty = torch.zeros(6, 6, dtype=torch.bool)
    assert dice(empty, empty).item() == 1.0 and iou(empty, empty).item() == 1.0  # documented
    assert dice(a, empty).item() == 0.0 and iou(empty, a).item() == 0.0


def test_dice_iou_batched_per_image_then_mean():
    pred = random_mask((3, 2, 10, 12), seed=1)
    gt = random_mask((3, 2, 10, 12), seed=2)
    per = dice(pred, gt, reduction="none")
    assert per.shape == (3, 2) and per.dtype == torch.float64
    for b in range(3):
        for c in range(2):
            p, g = pred[b, c].numpy(), gt[b, c].numpy()
            assert per[b, c].item() == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()))
            assert iou(pred, gt, reduction="none")[b, c].item() == pytest.approx((p & g).sum() / (p | g).sum())
    assert dice(pred, gt).item() == pytest.approx(per.mean().item())
    # float 0/1 masks and numpy arrays are accepted
    assert dice(pred.float().numpy(), gt.double()).item() == pytest.approx(per.mean().item())


# ---- boundaries --------------------------------------------------------------------------------

def test_inner_boundary_matches_skimage():
    for k, shape in enumerate([(1, 1), (1, 7), (6, 1), (13, 17), (30, 31)]):
        for density in (0.3, 0.7, 1.0):
            m = random_mask((1, 1) + shape, density=density, seed=k)[0, 0]
            ours = inner_boundary(m).numpy()
            assert np.array_equal(ours, find_boundaries(m.numpy(), mode="inner"))


def test_boundary_distance_hand_cases():
    gt = square(10, 10, 2, 7, 2, 7)
    bd, bdsd = boundary_distance(gt, gt)
    assert bd.item() == 0.0 and bdsd.item() == 0.0
    # prediction shifted one column right: its inner boundary (16 pixels) vs gt's df.
    pred = square(10, 10, 2, 7, 3, 8)
    df = ndi.distance_transform_edt(gt.numpy()) + ndi.distance_transform_edt(~gt.numpy())
    df[find_boundaries(gt.numpy(), mode="inner")] = 0
    vals = df[find_boundaries(pred.numpy(), mode="inner")]
    # by hand, pred's 16 ring pixels: rows 2/6, columns 3-6 lie on gt's ring (df 0, 8 pixels);
    # column 7 lies outside gt next to it (df = EDT(1 - gt) = 1, 5 pixels); column 3, rows 3-5
    # lies inside gt two pixels from its background (df = EDT(gt) = 2, 3 pixels)
    assert sorted(vals.tolist()) == [0.0] * 8 + [1.0] * 5 + [2.0] * 3
    bd, bdsd = boundary_distance(pred, gt)
    assert bd.item() == pytest.approx(vals.mean()) and bdsd.item() == pytest.approx(vals.std())


def test_boundary_distance_matches_transcription():
    pairs = blob_pairs()
    pred = torch.stack([p for p, _ in pairs])[:, None]
    gt = torch.stack([g for _, g in pairs])[:, None]
    bd, bdsd = boundary_distance(pred, gt, reduction="none")
    assert bd.shape == (len(pairs), 1)
    for n, (p, g) in enumerate(pairs):
        e_bd, e_sd = np_boundary_distance(p.numpy(), g.numpy())
        assert bd[n, 0].item() == pytest.approx(e_bd, rel=1e-12)
        assert bdsd[n, 0].item() == pytest.approx(e_sd, rel=1e-12, abs=1e-12)
    mbd, msd = boundary_distance(pred, gt)
    assert mbd.item() == pytest.approx(bd.mean().item()) and msd.item() == pytest.approx(bdsd.mean().item())


def test_hd95_matches_medpy_transcription_and_hand_case():
    pairs = blob_pairs()
    pred = torch.stack([p for p, _ in pairs])
    gt = torch.stack([g for _, g in pairs])
    per = hd95(pred, gt, reduction="none")
    for n, (p, g) in enumerate(pairs):
        assert per[n].item() == pytest.approx(np_hd95(p.numpy(), g.numpy()), rel=1e-12)
    a = square(12, 12, 2, 6, 2, 6)
    assert hd95(a, a).item() == 0.0
    b = square(12, 12, 2, 6, 5, 9)  # shifted 3 columns: every far-side distance is 3
    assert hd95(a, b).item() == pytest.approx(np_hd95(a.numpy(), b.numpy()))
    assert hd95(a, b).item() == 3.0


def test_empty_masks_are_documented_values_not_nan():
    full = torch.ones(8, 8, dtype=torch.bool)
    empty = torch.zeros(8, 8, dtype=torch.bool)
    sq = square(8, 8, 2, 5, 2, 5)
    pred = torch.stack([empty, sq, empty, full, sq])
    gt = torch.stack([empty, empty, sq, full, sq])
    h = hd95(pred, gt, reduction="none")
    assert h.tolist() == [0.0, math.inf, math.inf, 0.0, 0.0]
    assert hd95(pred, gt).item() == math.inf  # not NaN
    assert hd95(pred, gt, empty_distance=11.3, reduction="none").tolist() == [0.0, 11.3, 11.3, 0.0, 0.0]
    bd, sd = boundary_distance(pred, gt, reduction="none", empty_distance=5.0)
    assert bd.tolist() == [0.0, 5.0, 5.0, 0.0, 0.0] and sd.tolist() == [0.0, 5.0, 5.0, 0.0, 0.0]
    bd, _ = boundary_distance(pred, gt)
    assert bd.item() == math.inf
    # a full mask has no inner boundary (skimage semantics) -> counts as "no boundary"
    bd, _ = boundary_distance(torch.stack([sq, full]), torch.stack([full, sq]), reduction="none")
    assert bd.tolist() == [math.inf, math.inf]


# ---- solidity ----------------------------------------------------------------------------------

def test_solidity_matches_skimage_regionprops():
    rng = np.random.default_rng(0)
    masks = [square(9, 9, 2, 5, 3, 8).numpy(), np.eye(7, dtype=bool), np.ones((1, 1), bool)]
    masks += [np.asarray(random_mask((1, 1, 23, 19), density=d, seed=s, blobs=True)[0, 0])
              for s, d in enumerate([0.2, 0.5, 0.8])]
    masks += [rng.random((15, 16)) < 0.3]  # scattered pixels: very non-convex
    ds = SyntheticShapes(6, 48, seed=5, noise_std=0.0)
    masks += [ds.render(i)["mask"][0].numpy() > 0 for i in range(6)]
    L = np.zeros((5, 5), bool)
    L[:, 0] = True
    L[-1, :] = True
    masks.append(L)
    for m in masks:
        expect = regionprops(m.astype(np.uint8))[0].solidity
        assert solidity(torch.from_numpy(m)).item() == pytest.approx(expect, rel=1e-12)
    assert solidity(torch.from_numpy(masks[0])).item() == 1.0  # a rectangle is convex
    assert solidity(torch.from_numpy(L)).item() < 0.7


def test_solidity_batched_and_empty():
    m = torch.zeros(2, 3, 10, 10, dtype=torch.bool)
    m[0, 1, 2:6, 2:8] = True
    m[1, 2, :, 4] = True
    m[1, 2, 9, :] = True
    per = solidity(m, reduction="none")
    assert per.shape == (2, 3)
    assert per[0, 0].item() == 1.0  # empty: documented as 1 (the empty set is convex)
    assert per[0, 1].item() == 1.0 and per[1, 2].item() < 1.0
    assert solidity(m).item() == pytest.approx(per.mean().item())


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [dice, iou, hd95, boundary_distance])
def test_bad_input(fn):
    ok = torch.zeros(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        fn(ok, torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pred"):
        fn(torch.full((1, 4, 4), 0.5), ok)
    with pytest.raises(ValueError, match="gt"):
        fn(ok, torch.full((1, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="pred"):
        fn(torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pred"):
        fn(torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="pred"):
        fn([[0, 1]], ok)
    with pytest.raises(ValueError, match="reduction"):
        fn(ok, ok, reduction="sum")


def test_bad_empty_distance_and_solidity_input():
    ok = torch.zeros(4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="empty_distance"):
        hd95(ok, ok, empty_distance=-1.0)
    with pytest.raises(TypeError, match="empty_distance"):
        boundary_distance(ok, ok, empty_distance="inf")
    with pytest.raises(ValueError, match="mask"):
        solidity(torch.full((4, 4), 3))
