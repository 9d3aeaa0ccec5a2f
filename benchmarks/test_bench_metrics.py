"""Anomaly metrics (SPEC 3) on a 1e6-pixel test set (16 x 250 x 250, float32, ~5% anomalous
pixels in blob regions): geokernels vs scikit-learn (AUROC, AP) and vs a port of the MVTec AD
evaluation code's ``compute_pro`` + ``trapezoid`` (AUPRO), in the same run.

    pytest benchmarks/test_bench_metrics.py --benchmark-only      # pytest-benchmark tables
    python benchmarks/test_bench_metrics.py [--device cuda]       # one compact table

Issue 5 acceptance: AUPRO of 1e6 pixels in < 2 s on the project CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from bisect import bisect_right

import numpy as np
import pytest
import scipy.ndimage
import torch

from geokernels.metrics import AnomalyMetricAccumulator, aupro, auroc, average_precision


def make_test_set(n_images=16, height=250, width=250, seed=0):
    """Heatmaps (N, H, W) float32 and masks (N, H, W) bool; 1e6 pixels by default."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, height, width), dtype=bool)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n_images):
        if i % 4 == 0:
            continue                                   # anomaly-free images
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(5, 25, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    heat = scipy.ndimage.gaussian_filter(rng.random(masks.shape), (0, 2, 2))
    heat += 0.05 * scipy.ndimage.gaussian_filter(masks.astype(float), (0, 3, 3))
    return heat.astype(np.float32), masks


def mvtec_reference_aupro(heatmaps, masks, fpr_limit=0.3):
    """Port of the MVTec AD evaluation code (sorts every pixel, float64 per-pixel arrays)."""
    structure = np.ones((3, 3), dtype=int)
    fp_changes = np.zeros(heatmaps.shape, dtype=np.uint32)
    pro_changes = np.zeros(heatmaps.shape, dtype=np.float64)
    num_ok_pixels = num_regions = 0
    for i, gt in enumerate(masks):
        labelled, n = scipy.ndimage.label(gt, structure)
        num_regions += n
        ok = labelled == 0
        num_ok_pixels += ok.sum()
        fp_changes[i, ok] = 1
        for k in range(n):
            region = labelled == k + 1
            pro_changes[i, region] = 1.0 / region.sum()
    scores = heatmaps.ravel().copy()
    order = np.argsort(scores).astype(np.uint32)[::-1]
    scores = scores[order]
    fprs = np.cumsum(fp_changes.ravel()[order]) / num_ok_pixels
    pros = np.cumsum(pro_changes.ravel()[order]) / num_regions
    keep = np.append(np.diff(scores) != 0, True)
    x = np.concatenate([[0.0], fprs[keep], [1.0]])
    y = np.concatenate([[0.0], pros[keep], [1.0]])
    correction = 0.0
    if fpr_limit not in x:
        ins = bisect_right(x, fpr_limit)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (fpr_limit - x[ins - 1])
    inside = x <= fpr_limit
    x, y = x[inside], y[inside]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / fpr_limit


@pytest.fixture(scope="module")
def test_set():
    heat, masks = make_test_set()
    return heat, masks, torch.from_numpy(heat), torch.from_numpy(masks)


def test_aupro_geokernels(benchmark, test_set):
    heat, masks, heat_t, masks_t = test_set
    value = benchmark(aupro, heat_t, masks_t)
    assert abs(value - mvtec_reference_aupro(heat, masks)) <= 1e-9


def test_aupro_mvtec_reference(benchmark, test_set):
    heat, masks, _, _ = test_set
    benchmark.pedantic(mvtec_reference_aupro, args=(heat, masks), rounds=3, iterations=1)


def test_pixel_auroc_geokernels(benchmark, test_set):
    from sklearn.metrics import roc_auc_score

    heat, masks, heat_t, masks_t = test_set
    value = benchmark(auroc, heat_t, masks_t)
    assert abs(value - roc_auc_score(masks.ravel(), heat.ravel())) <= 1e-9


def test_pixel_auroc_sklearn(benchmark, test_set):
    from sklearn.metrics import roc_auc_score

    heat, masks, _, _ = test_set
    benchmark.pedantic(roc_auc_score, args=(masks.ravel(), heat.ravel()), rounds=3, iterations=1)


def test_pixel_ap_geokernels(benchmark, test_set):
    from sklearn.metrics import average_precision_score

    heat, masks, heat_t, masks_t = test_set
    value = benchmark(average_precision, heat_t, masks_t)
    assert abs(value - average_precision_score(masks.ravel(), heat.ravel())) <= 1e-9


def test_pixel_ap_sklearn(benchmark, test_set):
    from sklearn.metrics import average_precision_score

    heat, masks, _, _ = test_set
    benchmark.pedantic(average_precision_score, args=(masks.ravel(), heat.ravel()), rounds=3,
                       iterations=1)


def test_accumulator_all_metrics(benchmark, test_set):
    _, _, heat_t, masks_t = test_set

    def run():
        acc = AnomalyMetricAccumulator()
        for start in range(0, heat_t.shape[0], 4):
            acc.update(heatmaps=heat_t[start:start + 4], masks=masks_t[start:start + 4],
                       image_scores=heat_t[start:start + 4].flatten(1).amax(1))
        return acc.compute()

    benchmark(run)


# --------------------------------------------------------------------------------------------
# compact table: python benchmarks/test_bench_metrics.py [--device cuda] [--pixels N]
# --------------------------------------------------------------------------------------------
def _time(fn, device, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=16, help="250x250 images (16 = 1e6 px)")
    args = parser.parse_args(argv)
    from sklearn.metrics import average_precision_score, roc_auc_score

    device = torch.device(args.device)
    heat, masks = make_test_set(n_images=args.images)
    heat_t, masks_t = torch.from_numpy(heat).to(device), torch.from_numpy(masks).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = [
        ("aupro", lambda: aupro(heat_t, masks_t), lambda: mvtec_reference_aupro(heat, masks),
         "MVTec compute_pro"),
        ("pixel auroc", lambda: auroc(heat_t, masks_t),
         lambda: roc_auc_score(masks.ravel(), heat.ravel()), "sklearn"),
        ("pixel ap", lambda: average_precision(heat_t, masks_t),
         lambda: average_precision_score(masks.ravel(), heat.ravel()), "sklearn"),
    ]
    print(f"{heat.size:,} pixels, {masks.mean():.1%} anomalous, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'metric':<12} {'geokernels s':>13} {'reference s':>12} {'speed-up':>9}  reference")
    for name, ours, ref, ref_name in rows:
        t_ours, t_ref = _time(ours, device), _time(ref, torch.device("cpu"), repeats=3)
        diff = abs(ours() - ref())
        print(f"{name:<12} {t_ours:13.4f} {t_ref:12.4f} {t_ref / t_ours:8.1f}x  {ref_name} "
              f"(|diff| {diff:.1e})")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB "
              f"(inputs {(heat_t.nbytes + masks_t.nbytes) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
