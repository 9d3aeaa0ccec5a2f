"""Anomaly metrics (SPEC 3) vs scikit-learn (AUROC, AP, F1-max) and vs a direct per-threshold
AUPRO reference written here; ties, input types, edge cases, streaming accumulator, CUDA."""
from __future__ import annotations

from bisect import bisect_right

import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from geokernels.metrics import (AnomalyMetricAccumulator, aupro, auroc, average_precision,
                                f1_max)

TOL = 1e-9
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------------------------
# direct references
# --------------------------------------------------------------------------------------------
def sklearn_f1_max(labels, scores):
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]          # drop the (P=1, R=0) end point
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    best = np.max(f1)
    # highest threshold reaching the maximum (thresholds ascend in scikit-learn)
    return best, thresholds[np.flatnonzero(f1 == best)[-1]]


def reference_aupro(heatmaps, masks, fpr_limit=0.3):
    """Literal MVTec protocol: one pass over all pixels per distinct threshold."""
    heatmaps = np.asarray(heatmaps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if heatmaps.ndim == 2:
        heatmaps, masks = heatmaps[None], masks[None]
    regions = []
    for i in range(masks.shape[0]):
        labelled, n = scipy.ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    negatives = heatmaps[~masks]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(heatmaps)[::-1]:
        fprs.append(np.mean(negatives >= threshold))
        pros.append(np.mean([np.mean(heatmaps[i][r] >= threshold) for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    x, y = np.array(fprs), np.array(pros)
    correction = 0.0
    if fpr_limit not in x:                                     # MVTec's trapezoid(x_max=...)
        ins = bisect_right(x, fpr_limit)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (fpr_limit - x[ins - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / fpr_limit


def random_binary(rng, n, p=0.3):
    labels = rng.random(n) < p
    labels[0], labels[-1] = True, False                        # both classes present
    return labels


def random_scores(rng, shape, kind):
    if kind == "continuous":
        return rng.normal(size=shape)
    if kind == "tied":
        return rng.integers(0, 5, size=shape).astype(np.float64)
    if kind == "heavily_tied":
        return rng.integers(0, 2, size=shape).astype(np.float64)
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# image-level / flattened metrics vs scikit-learn
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["continuous", "tied", "heavily_tied"])
@pytest.mark.parametrize("n", [2, 3, 17, 1000, 4099])
def test_auroc_ap_f1_match_sklearn(kind, n):
    rng = np.random.default_rng(n)
    labels = random_binary(rng, n)
    scores = random_scores(rng, n, kind)
    assert abs(auroc(scores, labels) - roc_auc_score(labels, scores)) <= TOL
    assert abs(average_precision(scores, labels) - average_precision_score(labels, scores)) <= TOL
    f1, threshold = f1_max(scores, labels, return_threshold=True)
    ref_f1, ref_threshold = sklearn_f1_max(labels, scores)
    assert abs(f1 - ref_f1) <= TOL
    assert threshold == ref_threshold
    assert f1_max(scores, labels) == f1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
def test_torch_dtypes_match_sklearn_on_the_same_values(dtype):
    g = torch.Generator().manual_seed(1)
    if dtype == torch.int64:
        scores = torch.randint(-3, 4, (3, 50), generator=g)
    else:
        scores = torch.randn(3, 50, generator=g).to(dtype)
    labels = torch.rand(3, 50, generator=g) < 0.25
    ref_scores = scores.double().numpy().ravel()              # every dtype widens exactly
    ref_labels = labels.numpy().ravel()
    assert abs(auroc(scores, labels) - roc_auc_score(ref_labels, ref_scores)) <= TOL
    assert abs(average_precision(scores, labels)
               - average_precision_score(ref_labels, ref_scores)) <= TOL


def test_heatmaps_are_flattened_for_pixel_metrics():
    rng = np.random.default_rng(3)
    heat = rng.random((4, 9, 11)).astype(np.float32)
    masks = rng.random((4, 9, 11)) < 0.2
    assert abs(auroc(torch.from_numpy(heat), torch.from_numpy(masks))
               - roc_auc_score(masks.ravel(), heat.ravel())) <= TOL


def test_input_kinds_agree():
    rng = np.random.default_rng(4)
    scores = rng.random(64)
    labels = random_binary(rng, 64)
    expected = roc_auc_score(labels, scores)
    for s, y in [(scores, labels), (scores.tolist(), labels.astype(int).tolist()),
                 (torch.from_numpy(scores), torch.from_numpy(labels)),
                 (torch.from_numpy(scores), torch.from_numpy(labels.astype(np.float32))),
                 (scores[::-1].copy()[::-1], labels)]:              # non-contiguous numpy view
        assert abs(auroc(s, y) - expected) <= TOL
    # a non-contiguous torch view
    big = torch.from_numpy(np.stack([scores, scores])).t()
    assert abs(auroc(big[:, 0], torch.from_numpy(labels)) - expected) <= TOL


def test_known_values():
    # perfect separation, perfect inversion, one constant score
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    assert average_precision([0.5] * 4, [0, 1, 1, 1]) == 0.75   # = prevalence when all tied
    assert f1_max([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], return_threshold=True) == (1.0, 0.8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40))
def test_property_tied_integer_scores(pairs):
    scores = np.array([p[0] for p in pairs], dtype=np.float64)
    labels = np.array([p[1] for p in pairs])
    if labels.all() or not labels.any():
        with pytest.raises(ValueError, match="only"):
            auroc(scores, labels)
        return
    assert abs(auroc(scores, labels) - roc_auc_score(labels, scores)) <= TOL
    assert abs(average_precision(scores, labels) - average_precision_score(labels, scores)) <= TOL
    assert abs(f1_max(scores, labels) - sklearn_f1_max(labels, scores)[0]) <= TOL


# --------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("kind", ["continuous", "tied", "heavily_tied"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_direct_reference(kind, seed, fpr_limit):
    rng = np.random.default_rng(seed)
    n, h, w = int(rng.integers(1, 4)), int(rng.integers(5, 14)), int(rng.integers(5, 14))
    masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.4)
    masks[0, 0, 0], masks[0, -1, -1] = True, False
    heat = random_scores(rng, (n, h, w), kind) + 0.7 * masks
    got = aupro(torch.from_numpy(heat), torch.from_numpy(masks), fpr_limit=fpr_limit)
    assert abs(got - reference_aupro(heat, masks, fpr_limit)) <= TOL


def test_aupro_blob_masks_float32_matches_reference():
    rng = np.random.default_rng(7)
    masks = np.zeros((2, 24, 20), dtype=bool)
    masks[0, 3:9, 4:12] = True
    masks[0, 15:18, 2:4] = True
    masks[1, 10:20, 10:13] = True
    heat = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
    assert abs(aupro(heat, masks) - reference_aupro(heat.astype(np.float64), masks)) <= TOL


def test_aupro_uses_8_connectivity():
    # a horizontal pair plus a pixel touching it diagonally: one region of 3 pixels under
    # 8-connectivity (PRO = 1/3 once the diagonal pixel is detected), two regions under
    # 4-connectivity (PRO would be 1/2)
    masks = np.zeros((3, 3), dtype=bool)
    masks[0, 0] = masks[0, 1] = masks[1, 2] = True
    heat = np.where(masks, 0.2, 0.5)
    heat[1, 2] = 0.9
    assert abs(aupro(heat, masks, fpr_limit=1.0) - 1 / 3) <= TOL
    assert abs(aupro(heat, masks, fpr_limit=0.3) - 1 / 3) <= TOL


def test_aupro_regions_do_not_cross_images():
    # one pixel in image 0 and a 2-pixel region at the same place in image 1: two regions
    # (sizes 1 and 2). Only the first is detected at threshold 1, so PRO = 1/2 at FPR 0 (it would
    # be 1/3 if the regions were merged across images), then the tie at 0 leads straight to (1, 1)
    masks = np.zeros((2, 2, 2), dtype=bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 1] = True
    heat = np.zeros((2, 2, 2))
    heat[0, 0, 0] = 1.0
    assert abs(aupro(heat, masks, fpr_limit=1.0) - 0.75) <= TOL
    assert abs(reference_aupro(heat, masks, fpr_limit=1.0) - 0.75) <= TOL


def test_aupro_constant_heatmap_interpolates_the_diagonal():
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2:5, 2:5] = True
    heat = np.full((1, 8, 8), 0.25)
    for limit in (0.3, 0.5, 1.0):
        # curve (0, 0) -> (1, 1): normalised area up to L is L / 2
        assert abs(aupro(heat, masks, fpr_limit=limit) - limit / 2) <= TOL


def test_aupro_shapes_and_input_kinds():
    rng = np.random.default_rng(11)
    masks = rng.random((2, 7, 9)) < 0.3
    heat = rng.random((2, 7, 9))
    expected = reference_aupro(heat, masks)
    assert abs(aupro(heat[:, None], masks[:, None]) - expected) <= TOL           # (N, 1, H, W)
    assert abs(aupro(torch.from_numpy(heat), torch.from_numpy(masks).float()) - expected) <= TOL
    single = reference_aupro(heat[0], masks[0])
    assert abs(aupro(heat[0], masks[0].astype(np.uint8)) - single) <= TOL        # (H, W)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", [auroc, average_precision, f1_max])
@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_single_class_labels_are_an_error(metric, labels):
    with pytest.raises(ValueError, match="labels contain only"):
        metric([0.1, 0.5, 0.9], labels)


@pytest.mark.parametrize("metric", [auroc, average_precision, f1_max])
def test_bad_scores_and_labels(metric):
    with pytest.raises(ValueError, match="scores contains NaN"):
        metric([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="labels must contain only 0 and 1, found 2"):
        metric([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="divide 0/255"):
        metric([0.1, 0.2], [0, 255])
    with pytest.raises(ValueError, match="same shape"):
        metric([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="scores must not be empty"):
        metric([], [])
    with pytest.raises(TypeError, match="scores must hold real numbers"):
        metric(torch.tensor([True, False]), [0, 1])
    with pytest.raises(TypeError, match="scores must be"):
        metric("0.1 0.2", [0, 1])


def test_aupro_bad_input():
    heat = np.random.default_rng(0).random((2, 5, 5))
    masks = np.zeros((2, 5, 5), dtype=bool)
    with pytest.raises(ValueError, match="no anomalous pixel"):
        aupro(heat, masks)
    with pytest.raises(ValueError, match="no normal pixel"):
        aupro(heat, ~masks)
    masks[0, 1, 1] = True
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(heat, masks, fpr_limit=bad)
    with pytest.raises(TypeError, match="fpr_limit"):
        aupro(heat, masks, fpr_limit="0.3")
    with pytest.raises(ValueError, match="heatmaps and masks must have the same shape"):
        aupro(heat, masks[:1])
    with pytest.raises(ValueError, match="heatmaps must have shape"):
        aupro(heat[:, None].repeat(3, 1), masks[:, None].repeat(3, 1))
    with pytest.raises(ValueError, match="masks must contain only 0 and 1"):
        aupro(heat, masks * 255)
    with pytest.raises(ValueError, match="heatmaps contains NaN"):
        aupro(np.where(masks, np.nan, heat), masks)


# --------------------------------------------------------------------------------------------
# streaming accumulator
# --------------------------------------------------------------------------------------------
def make_test_set(seed, n_batches=4, h=12, w=10, dtype=np.float32):
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(n_batches):
        n = int(rng.integers(1, 5))
        masks = np.zeros((n, h, w), dtype=bool)
        for i in range(n):
            if rng.random() < 0.6:                             # some anomaly-free images
                y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
                masks[i, y:y + int(rng.integers(1, 4)), x:x + int(rng.integers(1, 4))] = True
        heat = (rng.integers(0, 40, (n, h, w)) / 40 + 0.3 * masks).astype(dtype)  # ties
        scores = heat.reshape(n, -1).max(1)
        batches.append((heat, masks, scores, masks.reshape(n, -1).any(1)))
    batches[0][1][0, 0, 0] = True                              # both classes guaranteed
    batches[0][3][0] = True
    batches[-1][1][-1] = False
    batches[-1][3][-1] = False
    return batches


@pytest.mark.parametrize("chunk_size", [7, 1 << 22])
def test_accumulator_equals_one_shot(chunk_size):
    batches = make_test_set(0, n_batches=5)
    acc = AnomalyMetricAccumulator(chunk_size=chunk_size)
    for heat, masks, scores, labels in batches:
        acc.update(heatmaps=torch.from_numpy(heat), masks=torch.from_numpy(masks),
                   image_scores=torch.from_numpy(scores), image_labels=torch.from_numpy(labels))
    result = acc.compute()
    heat = np.concatenate([b[0] for b in batches])
    masks = np.concatenate([b[1] for b in batches])
    scores = np.concatenate([b[2] for b in batches])
    labels = np.concatenate([b[3] for b in batches])
    expected = {
        "image_auroc": auroc(scores, labels), "image_ap": average_precision(scores, labels),
        "image_f1_max": f1_max(scores, labels), "pixel_auroc": auroc(heat, masks),
        "pixel_ap": average_precision(heat, masks), "pixel_f1_max": f1_max(heat, masks),
        "aupro": aupro(heat, masks),
    }
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(result[key] - value) <= 1e-12, key
    # and against the independent references
    assert abs(result["pixel_auroc"] - roc_auc_score(masks.ravel(), heat.ravel())) <= TOL
    assert abs(result["image_ap"] - average_precision_score(labels, scores)) <= TOL
    assert abs(result["aupro"] - reference_aupro(heat, masks)) <= TOL
    assert acc.num_pixels == heat.size and acc.num_images == scores.size


def test_accumulator_derives_image_labels_from_masks_and_resets():
    batches = make_test_set(1, n_batches=3)
    acc = AnomalyMetricAccumulator()
    for heat, masks, scores, _ in batches:
        acc.update(heatmaps=heat, masks=masks, image_scores=scores)
    labels = np.concatenate([b[1] for b in batches]).reshape(-1, 120).any(1)
    scores = np.concatenate([b[2] for b in batches])
    assert abs(acc.compute()["image_auroc"] - roc_auc_score(labels, scores)) <= TOL
    acc.reset()
    assert acc.num_pixels == 0
    with pytest.raises(ValueError, match="no data"):
        acc.compute()


def test_accumulator_image_only_and_fpr_limit():
    acc = AnomalyMetricAccumulator(fpr_limit=0.1)
    acc.update(image_scores=[0.1, 0.7], image_labels=[0, 1])
    acc.update(image_scores=[0.4], image_labels=[0])
    assert acc.compute() == {"image_auroc": 1.0, "image_ap": 1.0, "image_f1_max": 1.0}
    batches = make_test_set(2)
    for heat, masks, _, _ in batches:
        acc.update(heatmaps=heat, masks=masks)
    heat = np.concatenate([b[0] for b in batches])
    masks = np.concatenate([b[1] for b in batches])
    assert abs(acc.compute()["aupro"] - reference_aupro(heat, masks, 0.1)) <= TOL


def test_accumulator_bad_input():
    acc = AnomalyMetricAccumulator()
    with pytest.raises(ValueError, match="heatmaps and masks must be given together"):
        acc.update(heatmaps=np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="needs heatmaps"):
        acc.update()
    with pytest.raises(ValueError, match="image_labels are required"):
        acc.update(image_scores=[0.1])
    with pytest.raises(ValueError, match="same number of entries"):
        acc.update(image_scores=[0.1, 0.2], image_labels=[1])
    acc.update(image_scores=np.array([0.1, 0.2], dtype=np.float32), image_labels=[1, 1])
    with pytest.raises(ValueError, match="image_labels contain only 1"):
        acc.compute()
    with pytest.raises(TypeError, match="float64 but earlier batches were float32"):
        acc.update(image_scores=np.array([0.3]), image_labels=[0])
    acc64 = AnomalyMetricAccumulator(dtype=torch.float64)
    acc64.update(image_scores=np.array([0.1], dtype=np.float32), image_labels=[0])
    acc64.update(image_scores=np.array([0.3]), image_labels=[1])
    assert acc64.compute()["image_auroc"] == 1.0
    with pytest.raises(ValueError, match="fpr_limit"):
        AnomalyMetricAccumulator(fpr_limit=0)
    with pytest.raises(ValueError, match="chunk_size"):
        AnomalyMetricAccumulator(chunk_size=0)
    with pytest.raises(ValueError, match="dtype"):
        AnomalyMetricAccumulator(dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# CUDA (and the torch code path CUDA takes, exercised on the CPU)
# --------------------------------------------------------------------------------------------
def test_torch_code_path_matches_numpy_path(monkeypatch):
    from geokernels.metrics import anomaly

    batches = make_test_set(4, n_batches=3)
    heat = torch.from_numpy(np.concatenate([b[0] for b in batches]))
    masks = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    fast = {fn.__name__: fn(heat, masks) for fn in (auroc, average_precision, f1_max, aupro)}
    monkeypatch.setattr(anomaly, "_NUMPY_ON_CPU", False)
    for fn in (auroc, average_precision, f1_max, aupro):
        assert abs(fn(heat, masks) - fast[fn.__name__]) <= 1e-12, fn.__name__
    acc = AnomalyMetricAccumulator(chunk_size=50)
    for h, m, sc, y in batches:
        acc.update(heatmaps=h, masks=m, image_scores=sc, image_labels=y)
    result = acc.compute()
    assert abs(result["aupro"] - reference_aupro(heat.double().numpy(), masks.numpy())) <= TOL
    assert abs(result["pixel_auroc"] - fast["auroc"]) <= 1e-12
    with pytest.raises(ValueError, match="heatmaps contains NaN"):
        aupro(torch.where(masks, float("nan"), heat), masks)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    batches = make_test_set(3, n_batches=4)
    heat = torch.from_numpy(np.concatenate([b[0] for b in batches])).to(dtype)
    masks = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    for fn in (auroc, average_precision, f1_max):
        assert abs(fn(heat.cuda(), masks.cuda()) - fn(heat, masks)) <= 1e-12, fn.__name__
    assert abs(aupro(heat.cuda(), masks.cuda()) - aupro(heat, masks)) <= 1e-12
    assert abs(aupro(heat.cuda(), masks.cuda())
               - reference_aupro(heat.double().numpy(), masks.numpy())) <= TOL
    acc_cpu, acc_gpu = AnomalyMetricAccumulator(), AnomalyMetricAccumulator(chunk_size=100)
    for h, m, s, y in batches:
        acc_cpu.update(heatmaps=torch.from_numpy(h), masks=torch.from_numpy(m),
                       image_scores=torch.from_numpy(s), image_labels=torch.from_numpy(y))
        acc_gpu.update(heatmaps=torch.from_numpy(h).cuda(), masks=torch.from_numpy(m).cuda(),
                       image_scores=torch.from_numpy(s).cuda(),
                       image_labels=torch.from_numpy(y).cuda())
    cpu, gpu = acc_cpu.compute(), acc_gpu.compute()
    for key in cpu:
        assert abs(cpu[key] - gpu[key]) <= 1e-12, key
    with pytest.raises(ValueError, match="earlier batches were on"):
        acc_gpu.update(heatmaps=torch.from_numpy(batches[0][0]), masks=torch.from_numpy(batches[0][1]))


@pytest.mark.cuda
@requires_cuda
def test_cuda_large_tied_matches_sklearn():
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 1000, (300_000,), generator=g).float()
    labels = torch.rand(300_000, generator=g) < 0.1
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert abs(auroc(scores.cuda(), labels.cuda()) - expected) <= TOL
    expected_ap = average_precision_score(labels.numpy(), scores.numpy())
    assert abs(average_precision(scores.cuda(), labels.cuda()) - expected_ap) <= TOL
