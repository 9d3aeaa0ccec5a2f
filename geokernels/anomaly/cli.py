"""``geokernels anomaly train | score | eval``: the flow-mismatch detector from the command line.

    geokernels anomaly train --dataset textures --out runs/tex              # offline, no download
    geokernels anomaly train --dataset mvtec --root /data/mvtec --categories bottle --out runs/b
    torchrun --nproc_per_node 8 -m geokernels anomaly train ...             # same command, N GPUs
    geokernels anomaly eval --dataset textures --out eval_dir               # shipped checkpoint
    geokernels anomaly eval --checkpoint runs/tex/detector.pt --dataset textures --out eval_dir \\
        --methods mismatch reconstruction calibrated_mismatch
    geokernels anomaly score --checkpoint runs/b/detector.pt img1.png img2.png --out heatmaps

``eval`` writes DIR/metrics.json (image_auroc, pixel_auroc, aupro, image_ap, pixel_ap: means over
categories, plus per-category entries and one block per method), DIR/metrics.md (the table) and
DIR/overlays/<method>_<category>.png (image | heatmap overlay | ground truth, normals then defects).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from geokernels._files import write_json_atomic, write_text_atomic

DATASETS = ("textures", "mvtec", "visa")
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap")
METRIC_TITLES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
                 "image_ap": "image AP", "pixel_ap": "pixel AP"}


# ------------------------------------------------------------------------------ datasets
def _trained_categories(det, dataset: str) -> list[str] | None:
    """The categories a single-model or pooled detector was trained on, from the metadata that
    `anomaly train` writes (an unconditional detector has no categories of its own): without
    it, eval scored every category under --root with a model trained on one of them."""
    meta = getattr(det, "metadata", None) or {}
    if meta.get("dataset") == dataset and meta.get("categories"):
        return [str(c) for c in meta["categories"]]
    return None


def _default_categories(dataset: str, root) -> list[str]:
    from geokernels.anomaly._compat import dataset_class

    if dataset == "textures":
        try:
            from geokernels.data import texture_categories

            return list(texture_categories())
        except ImportError:
            raise SystemExit("error: --dataset textures needs geokernels.data."
                             "TextureAnomalyDataset, which this build lacks") from None
    if root is None:
        raise SystemExit(f"error: --dataset {dataset} needs --root (the dataset folder)")
    cls = dataset_class("MVTecAD" if dataset == "mvtec" else "VisA")
    if hasattr(cls, "available_categories"):
        return list(cls.available_categories(root))
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "train")))


def open_dataset(dataset: str, root, category: str, split: str, size: int, *,
                 num_train: int | None = None, seed: int = 0):
    """One category/split of the named dataset, images resized to ``size``."""
    from geokernels.anomaly._compat import dataset_class

    if dataset == "textures":
        cls = dataset_class("TextureAnomalyDataset")
        kwargs = {} if num_train is None else {"num_train": int(num_train)}
        return cls(category=category, split=split, size=size, seed=seed, **kwargs)
    if root is None:
        raise SystemExit(f"error: --dataset {dataset} needs --root (the dataset folder)")
    if not os.path.isdir(root):
        raise SystemExit(f"error: --root {root!r} is not a directory")
    cls = dataset_class("MVTecAD" if dataset == "mvtec" else "VisA")
    return cls(root, category, split, size)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def _limited(ds, labels, n: int) -> list[int]:
    """Indices of at most n normal and n defective items: the first n normals, and defective
    items taken round-robin over the defect types (MVTec/VisA list them folder by folder, so the
    first n were one or two defect types)."""
    normal = [i for i, y in enumerate(labels) if y == 0][:n]
    bad = [i for i, y in enumerate(labels) if y == 1]
    defects = getattr(ds, "defects", None)
    if defects is not None and not callable(defects):
        by_type: dict = {}
        for i in bad:
            by_type.setdefault(defects[i], []).append(i)
        queues = list(by_type.values())
        bad = [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]
    return sorted(normal + bad[:n])


def _labels_of(ds) -> list[int]:
    labels = getattr(ds, "labels", None)
    if labels is not None and not callable(labels):
        return [int(v) for v in labels]
    return [int(ds[i]["label"]) for i in range(len(ds))]


def _train_split(args, category):
    """(training dataset, held-out normal dataset or None) of one category."""
    ds = open_dataset(args.dataset, args.root, category, "train", args.image_size,
                      num_train=args.num_train, seed=args.data_seed)
    if len(ds) == 0:
        raise SystemExit(f"error: the {args.dataset} train split of {category!r} is empty")
    if args.holdout and args.dataset != "textures":
        if args.holdout >= len(ds):
            raise SystemExit(f"error: --holdout {args.holdout} leaves no training images for "
                             f"{category!r} ({len(ds)} in total)")
        n = len(ds) - args.holdout
        return _Subset(ds, range(n)), _Subset(ds, range(n, len(ds)))
    return ds, None


def _calibration_set(det, dataset, root, category, size, n_images):
    """Normal images for the calibrated variant, and a note on where they came from (held out
    only where the dataset has unseen normal images: the texture photos have no normal region
    outside the training rows, so their calibration crops overlap the training crops)."""
    meta = det.metadata or {}
    if dataset == "textures":
        num_train = int(meta.get("num_train") or 200)
        ds = open_dataset("textures", None, category, "train", size,
                          num_train=num_train + n_images, seed=int(meta.get("data_seed", 0)))
        return _Subset(ds, range(num_train, num_train + n_images)), \
            f"{n_images} extra crops from the training rows (not training crops, but their " \
            f"pixels overlap them: not held out, so the calibration is optimistic)"
    ds = open_dataset(dataset, root, category, "train", size)
    holdout = int(meta.get("holdout") or 0)
    if holdout:
        return _Subset(ds, range(len(ds) - holdout, len(ds))), \
            f"the {holdout} train images held out at training time"
    n = min(n_images, len(ds))
    return _Subset(ds, range(len(ds) - n, len(ds))), \
        f"{n} TRAINING images (not held out; train with --holdout N for a fair calibration)"


# ------------------------------------------------------------------------------ drawing
_COLORMAP = np.array([  # a compact "turbo"-like map: dark blue -> cyan -> green -> yellow -> red
    [0.19, 0.07, 0.23], [0.27, 0.38, 0.86], [0.16, 0.73, 0.92], [0.19, 0.95, 0.59],
    [0.64, 0.99, 0.24], [0.95, 0.78, 0.22], [0.96, 0.42, 0.09], [0.73, 0.15, 0.02],
    [0.48, 0.02, 0.01]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) float RGB."""
    v = np.clip(values, 0, 1) * (len(_COLORMAP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_COLORMAP) - 2)
    frac = (v - lo)[..., None]
    return _COLORMAP[lo] * (1 - frac) + _COLORMAP[lo + 1] * frac


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def overlay_tiles(image: torch.Tensor, heat: torch.Tensor, mask: torch.Tensor | None,
                  vmax: float) -> np.ndarray:
    """One row: image | heatmap blended over the image | ground-truth mask outline (uint8)."""
    from scipy import ndimage

    img = image.permute(1, 2, 0).numpy().astype(np.float32)
    hm = colorize(heat.numpy() / max(vmax, 1e-12))
    blend = 0.45 * img + 0.55 * hm
    gt = img.copy()
    if mask is not None and mask.sum() > 0:
        m = mask.numpy() > 0.5
        edge = m & ~ndimage.binary_erosion(m)
        gt[m] = 0.6 * gt[m] + 0.4 * np.array([1.0, 0.1, 0.1])
        gt[edge] = [1.0, 0.0, 0.0]
    sep = np.ones((img.shape[0], 2, 3), dtype=np.float32)
    return _to_uint8(np.concatenate([img, sep, blend, sep, gt], axis=1))


def write_overlay_grid(path, images, heats, masks, labels, scores, vmax, n_per_class=4):
    """PNG grid: the first n normal then the first n defective images, one row each."""
    from PIL import Image, ImageDraw

    labels = [int(v) for v in labels]
    rows_idx = [i for i, y in enumerate(labels) if y == 0][:n_per_class] + \
               [i for i, y in enumerate(labels) if y == 1][:n_per_class]
    rows = []
    for i in rows_idx:
        tile = Image.fromarray(overlay_tiles(images[i], heats[i],
                                             None if masks is None else masks[i], vmax))
        if images[i].shape[-1] >= 64:  # the default font is ~11 px tall: skip on tiny tiles
            ImageDraw.Draw(tile).text((3, 2), f"{'defect' if labels[i] else 'normal'} "
                                              f"{float(scores[i]):.3g}", fill=(255, 255, 0))
        rows.append(np.asarray(tile))
    if not rows:
        return None
    gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([r for row in rows for r in (row, gap)][:-1], axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


# ------------------------------------------------------------------------------ detector
def _paths_per_call(text: str):
    if text == "auto":
        return "auto"
    if text == "all":
        return "all"  # None (all paths) once past the "not given" check of _load_detector
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, all or an int, got {text!r}") from None


def _load_detector(args):
    from geokernels.models.detector import FlowMismatchDetector

    overrides = {}
    for name in ("K", "T", "batch_size", "paths_per_call", "seed", "agg", "smooth_sigma"):
        v = getattr(args, name.lower() if name in ("K", "T") else name, None)
        if v is not None:
            overrides[name] = None if (name, v) == ("paths_per_call", "all") else v
    opts = dict(device=args.device, precision=args.precision, compile=args.compile,
                backend=args.backend)
    try:
        if args.checkpoint:
            return FlowMismatchDetector.load(args.checkpoint, **opts, **overrides), args.checkpoint
        return FlowMismatchDetector.pretrained(**opts, **overrides), "pretrained:textures"
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    except ValueError as exc:  # CheckpointError and bad settings
        raise SystemExit(f"error: {exc}") from None


def _detector_category(det, category):
    """What to pass as ``category`` to the detector for a dataset category."""
    if det.categories is None:
        return None
    if category not in det.categories:
        raise SystemExit(f"error: the detector knows categories {det.categories}, not "
                         f"{category!r}")
    return category


def _image_size(det) -> int:
    m = next(iter(det.members.values()))
    size = m.config.get("image_size")
    if size is None:
        raise SystemExit("error: the checkpoint does not record its image size")
    return int(size)


def _stack(ds, progress=False, desc="loading"):
    it = range(len(ds))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, leave=False)
    images, masks, labels, paths, defects = [], [], [], [], []
    for i in it:
        s = ds[i]
        images.append(s["image"])
        masks.append(s["mask"].reshape(s["mask"].shape[-2:]) if s.get("mask") is not None
                     else torch.zeros(s["image"].shape[-2:]))
        labels.append(int(s["label"]))
        paths.append(str(s.get("path", i)))
        defects.append(str(s.get("defect", "good" if not s["label"] else "defect")))
    return torch.stack(images), torch.stack(masks), torch.tensor(labels), paths, defects


def _safe_metric(name, scores, labels, **k):
    """The metric, or NaN where it is undefined because ``labels`` hold a single class (e.g. a
    category or defect type without defective test images). Any other error (NaN heatmaps,
    heatmaps and masks of different sizes) is raised: caught, it became a NaN cell that the
    means over categories then silently left out."""
    from geokernels.anomaly._compat import metric

    positive = labels > 0
    if labels.numel() == 0 or bool(positive.all()) or not bool(positive.any()):
        return float("nan")
    return float(metric(name)(scores, labels, **k))


def compute_metrics(heats, scores, masks, labels) -> dict:
    """Image AUROC/AP on scores, pixel AUROC/AP and AUPRO on heatmaps (defective+normal images)."""
    labels = labels.long()
    pix_labels = (masks > 0.5).to(torch.uint8)
    return {
        "image_auroc": _safe_metric("auroc", scores, labels),
        "pixel_auroc": _safe_metric("auroc", heats.flatten(), pix_labels.flatten()),
        "aupro": _safe_metric("aupro", heats, pix_labels),
        "image_ap": _safe_metric("average_precision", scores, labels),
        "pixel_ap": _safe_metric("average_precision", heats.flatten(), pix_labels.flatten()),
    }


def smoothing_report(heats, masks, labels, settings, sigmas) -> dict:
    """Metrics of the same heatmaps after extra Gaussian smoothing (non-default variants of the
    scoring: SPEC 3's optional sigma), each sigma re-scored with the detector's score mode."""
    from geokernels.ops import anomaly_score, smooth_heatmap

    out = {}
    for sigma in sigmas:
        h = smooth_heatmap(heats, float(sigma)) if sigma > 0 else heats
        sc = anomaly_score(h, mode=settings["score_mode"], topk=settings["topk"])
        out[f"{float(sigma):g}"] = compute_metrics(h, sc, masks, labels)
    return out


def smoothing_table(results: dict, methods: list[str]) -> str:
    rows = []
    for m in methods:
        cats = results["methods"][m]["categories"]
        sigmas = list(next(iter(cats.values())).get("smoothed", {}))
        for sigma in sigmas:
            vals = {k: _mean([c["smoothed"][sigma][k] for c in cats.values()]) for k in METRIC_KEYS}
            rows.append(f"| {m} | {sigma} | " + " | ".join(_fmt(vals[k]) for k in METRIC_KEYS) + " |")
    if not rows:
        return ""
    head = "| method | extra smoothing sigma | " + " | ".join(METRIC_TITLES[k] for k in METRIC_KEYS) + " |"
    return ("\nMeans over categories with the heatmaps smoothed after scoring (non-default; "
            "sigma 0 = the scoring above):\n\n" + "\n".join([head, "|" + "---|" * (len(METRIC_KEYS) + 2)] + rows)
            + "\n")


def _mean(values):
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _fmt(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def markdown_table(results: dict, methods: list[str]) -> str:
    """Per-category (and mean) table, one row per (category, method)."""
    head = "| category | method | " + " | ".join(METRIC_TITLES[k] for k in METRIC_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(METRIC_KEYS) + 2)]
    cats = list(results["methods"][methods[0]]["categories"])
    for cat in cats + ["**mean**"]:
        for m in methods:
            block = results["methods"][m]
            row = block if cat == "**mean**" else block["categories"][cat]
            lines.append(f"| {cat} | {m} | " + " | ".join(_fmt(row.get(k)) for k in METRIC_KEYS)
                         + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ commands
def _set_threads(args):
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))


def _user_errors(command):
    """Run an ``anomaly`` command with bad input (an unknown category, a missing dataset file, a
    device this machine lacks, an out-of-range option, ...) as a one-line ``error:`` exit instead
    of a traceback: the library raises ValueError/FileNotFoundError naming the culprit."""
    import functools

    @functools.wraps(command)
    def run(args) -> int:
        try:
            if getattr(args, "device", None) is not None:
                from geokernels._backend import resolve_device

                resolve_device(args.device)
            return command(args)
        except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
            raise SystemExit(f"error: {exc}") from None

    return run


def _positive(low: int):
    """argparse type: an int >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def cmd_eval(args) -> int:
    _set_threads(args)
    for sigma in args.report_smoothing or ():
        if not (math.isfinite(sigma) and sigma >= 0):
            raise SystemExit(f"error: --report-smoothing sigmas must be finite and >= 0, got {sigma}")
    det, source = _load_detector(args)
    size = _image_size(det)
    categories = args.categories or det.categories or _trained_categories(det, args.dataset)
    if not categories:
        categories = _default_categories(args.dataset, args.root)
        if det.categories is None and len(categories) > 1:
            print(f"note: the checkpoint does not say which categories it was trained on; "
                  f"evaluating all {len(categories)} under the dataset (--categories to choose)",
                  file=sys.stderr)
    methods = args.methods
    os.makedirs(args.out, exist_ok=True)
    results = {"dataset": args.dataset, "root": args.root, "checkpoint": source,
               "image_size": size, "settings": dict(det.settings), "device": str(det.device),
               "method": methods[0], "methods": {m: {"categories": {}} for m in methods}}
    for cat in categories:
        test = open_dataset(args.dataset, args.root, cat, "test", size)
        if len(test) == 0:
            raise SystemExit(f"error: the {args.dataset} test split of {cat!r} is empty")
        if args.limit:
            test = _Subset(test, _limited(test, _labels_of(test), args.limit))
        images, masks, labels, paths, defects = _stack(test, progress=not args.quiet,
                                                       desc=f"loading {cat}")
        dcat = _detector_category(det, cat)
        mismatch_pass = None  # (heatmaps, seconds) of the default method, reused by calibrated
        for method in methods:
            entry = {"n_test": len(labels), "n_defective": int(labels.sum())}
            if method == "calibrated_mismatch":
                calib, note = _calibration_set(det, args.dataset, args.root, cat, size,
                                               args.calibration_images)
                det.calibrate(calib, category=dcat, progress=not args.quiet)
                entry["calibration"] = note
            if det.device.type == "cuda" and not (method == "calibrated_mismatch"
                                                  and mismatch_pass is not None):
                # untimed warm-up batch: CUDA context, cuDNN/Triton/compile set-up are not
                # images/s (on CPU there is no such one-off cost worth a batch)
                det.score(images[:det.settings["batch_size"]], category=dcat, method=method)
                entry["timing"] = "after one untimed warm-up batch"
            t0 = time.perf_counter()
            if method == "calibrated_mismatch" and mismatch_pass is not None:
                # a per-pixel transform of the mismatch heatmaps: no second scoring pass
                heats, scores = det.calibrated_from_mismatch(mismatch_pass[0], category=dcat)
                seconds = mismatch_pass[1] + time.perf_counter() - t0
                entry["heatmaps_from"] = "the mismatch scoring pass"
            else:
                heats, scores = det.score(images, category=dcat, method=method,
                                          progress=not args.quiet)
                seconds = time.perf_counter() - t0
            if method == "mismatch":
                mismatch_pass = (heats, seconds)
            entry.update(compute_metrics(heats, scores, masks, labels))
            entry.update(seconds=seconds, images_per_second=len(labels) / seconds)
            per_defect, pixel_per_defect = {}, {}
            for d in sorted(set(defects) - {"good"}):
                sel = torch.tensor([x in ("good", d) for x in defects])
                per_defect[d] = _safe_metric("auroc", scores[sel], labels[sel])
                pixel_per_defect[d] = _safe_metric("auroc", heats[sel].flatten(),
                                                   (masks[sel] > 0.5).to(torch.uint8).flatten())
            entry["image_auroc_per_defect"] = per_defect
            entry["pixel_auroc_per_defect"] = pixel_per_defect
            if args.report_smoothing:
                entry["smoothed"] = smoothing_report(heats, masks, labels, det.settings,
                                                     args.report_smoothing)
            results["methods"][method]["categories"][cat] = entry
            if args.overlays:
                normal_heat = heats[labels == 0]
                ref = normal_heat if len(normal_heat) else heats
                vmax = float(torch.quantile(ref.flatten()[:2_000_000].float(), 0.999)) * 1.5
                write_overlay_grid(os.path.join(args.out, "overlays", f"{method}_{cat}.png"),
                                   images, heats, masks, labels, scores, vmax, args.overlays)
            if not args.quiet:
                print(f"{cat:>14} {method:>20}: " + "  ".join(
                    f"{METRIC_TITLES[k]} {_fmt(entry[k])}" for k in METRIC_KEYS)
                    + f"  ({entry['images_per_second']:.2f} img/s)", flush=True)
    for m in methods:
        block = results["methods"][m]
        for k in METRIC_KEYS:
            block[k] = _mean([c[k] for c in block["categories"].values()])
    first = results["methods"][methods[0]]
    for k in METRIC_KEYS:
        results[k] = first[k]
    results["categories"] = first["categories"]
    write_json_atomic(os.path.join(args.out, "metrics.json"), results, default=float)
    table = markdown_table(results, methods) + smoothing_table(results, methods)
    write_text_atomic(os.path.join(args.out, "metrics.md"),
                      f"# Flow-mismatch anomaly detection: {args.dataset}\n\n"
                      f"Checkpoint: `{source}`; K={det.settings['K']}, T={det.settings['T']}, "
                      f"agg={det.settings['agg']}, image size {size}.\n\n{table}")
    print(table)
    return 0


def _load_image_file(path, size):
    """Decoded and resized exactly as the train/eval loaders do (16-bit PNGs scaled, not
    clipped; antialiased float resize), so `score` gives an image the score `eval` gives it."""
    from pathlib import Path

    from geokernels.data._io import DatasetError, load_image

    try:
        return load_image(Path(path), size)[0].contiguous()
    except FileNotFoundError:
        raise SystemExit(f"error: image {path!r} does not exist") from None
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_score(args) -> int:
    _set_threads(args)
    det, source = _load_detector(args)
    size = _image_size(det)
    images = torch.stack([_load_image_file(p, size) for p in args.images])
    category = args.category
    if det.categories is not None and category is None:
        raise SystemExit(f"error: --category is required; this detector knows {det.categories}")
    try:
        heats, scores = det.score(images, category=category, method=args.method,
                                  progress=not args.quiet)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    rows = [{"path": p, "score": float(s)} for p, s in zip(args.images, scores)]
    for r in rows:
        print(f"{r['score']:.6g}\t{r['path']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        from PIL import Image

        vmax = float(heats.max()) or 1.0
        stems = [os.path.splitext(os.path.basename(p))[0] for p in args.images]
        unique = len(set(stems)) == len(stems)   # MVTec names 000.png in every defect folder
        for i, (row, img, h) in enumerate(zip(rows, images, heats)):
            name = f"{stems[i]}_heatmap" if unique else f"{i:04d}_{stems[i]}_heatmap"
            Image.fromarray(overlay_tiles(img, h, None, vmax)).save(
                os.path.join(args.out, name + ".png"))
            np.save(os.path.join(args.out, name + ".npy"), h.numpy())
            row["heatmap"] = name + ".npy"
        write_json_atomic(os.path.join(args.out, "scores.json"),
                          {"checkpoint": source, "method": args.method, "scores": rows})
    return 0


def config_path(name_or_path: str) -> str:
    """A JSON config path, or the shipped ``geokernels/assets/train_<name>.json``."""
    if os.path.exists(name_or_path):
        return name_or_path
    from importlib import resources

    shipped = str(resources.files("geokernels") / "assets" / f"train_{name_or_path}.json")
    if os.path.exists(shipped):
        return shipped
    raise SystemExit(f"error: --config {name_or_path!r} is neither a file nor a shipped config")


def _record_explicit_flags(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` note in ``namespace._explicit`` every option given on the command line, so
    that ``--config`` cannot override a flag the user typed (even one equal to its default)."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue

        class _Recording(type(action)):
            def __call__(self, parser, namespace, values, option_string=None):
                explicit = set(getattr(namespace, "_explicit", ()))
                explicit.add(self.dest)
                namespace._explicit = explicit
                super().__call__(parser, namespace, values, option_string)

        action.__class__ = _Recording


def _apply_config(args) -> None:
    """Fill options from --config; flags given on the command line win."""
    path = config_path(args.config)
    try:
        with open(path) as fh:
            config = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read --config {path!r}: {exc}") from None
    defaults = args._defaults
    unknown = sorted(set(config) - set(defaults) - {"comment"})
    if unknown:
        raise SystemExit(f"error: unknown option(s) in {path!r}: {unknown}")
    for key, value in config.items():
        if key != "comment" and key not in getattr(args, "_explicit", ()):
            setattr(args, key, value)


def _train_or_exit(train, *args, **kwargs):
    """train(...), with an unreadable --resume checkpoint as a one-line error (it names the file)."""
    from geokernels.anomaly.checkpoint import CheckpointError

    try:
        return train(*args, **kwargs)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_train(args) -> int:
    if getattr(args, "config", None):
        _apply_config(args)
    _set_threads(args)
    from geokernels.anomaly.train import TrainConfig, _Dist, train
    from geokernels.models.detector import FlowMismatchDetector

    categories = args.categories or _default_categories(args.dataset, args.root)
    if not categories:
        raise SystemExit(f"error: no categories found for --dataset {args.dataset}")
    mode = args.mode or ("conditional" if len(categories) > 1 else "single")
    if mode == "single" and len(categories) > 1:
        mode = "pooled"
    model_kwargs = {}
    if args.base_width:
        model_kwargs["base_width"] = args.base_width
    if args.channel_mults:
        model_kwargs["channel_mults"] = tuple(args.channel_mults)
    if args.blocks_per_level:
        model_kwargs["blocks_per_level"] = args.blocks_per_level
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                         ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, augment=args.augment,
                         precision=args.precision, input_range="[-1,1]")
    try:
        config.validate()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    os.makedirs(args.out, exist_ok=True)
    dist_ctx = _Dist(args.device)  # one process group for all categories under torchrun
    splits = {c: _train_split(args, c) for c in categories}
    common = dict(preset=args.preset, model_kwargs=model_kwargs, config=config,
                  resume=args.resume, device=dist_ctx.device, progress=not args.quiet,
                  compile=args.compile_train)
    if args.time_budget is not None:   # 0 used to be ignored silently
        if not (math.isfinite(args.time_budget) and args.time_budget > 0):
            raise SystemExit(f"error: --time-budget must be a number of minutes > 0, got "
                             f"{args.time_budget}")
        share = len(categories) if mode == "per-category" else 1
        common["time_budget_s"] = args.time_budget * 60.0 / share
    t0 = time.perf_counter()
    runs = {}
    if mode == "per-category":
        models = {}
        for c, (ds, _) in splits.items():
            r = _train_or_exit(train, ds, checkpoint=os.path.join(args.out, f"train_{c}.pt"),
                               **common)
            models[c], runs[c] = r.model, r
        det = FlowMismatchDetector(models, device=dist_ctx.device)
    else:
        data = {c: ds for c, (ds, _) in splits.items()}
        if mode == "single":
            data = data[categories[0]]
        r = _train_or_exit(train, data, checkpoint=os.path.join(args.out, "train.pt"),
                           class_conditional=(mode == "conditional") if mode != "single"
                           else None, **common)
        runs["all"] = r
        det = FlowMismatchDetector(r.model, class_names=r.class_names, device=dist_ctx.device)
    seconds = time.perf_counter() - t0
    det.metadata = {"dataset": args.dataset, "categories": list(categories), "mode": mode,
                    "num_train": args.num_train, "data_seed": args.data_seed,
                    "holdout": args.holdout if args.dataset != "textures" else 0,
                    "image_size": args.image_size, "preset": args.preset,
                    "model_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in model_kwargs.items()},
                    "train_config": {k: (list(v) if isinstance(v, tuple) else v)
                                     for k, v in vars(config).items()},
                    "argv": list(sys.argv),
                    "options": {k: v for k, v in vars(args).items() if not k.startswith("_")
                                and isinstance(v, (str, int, float, bool, list, type(None)))}}
    if dist_ctx.main:
        path = det.save(os.path.join(args.out, "detector.pt"))
        log = {"detector": path, "seconds": seconds, "mode": mode, "world_size": dist_ctx.world,
               "device": str(dist_ctx.device), "metadata": det.metadata,
               "parameters_per_model": next(iter(det.members.values())).num_parameters(),
               "runs": {k: {"steps": r.step,
                            # NaN when no step ran (a finished run resumed): JSON null
                            "images_per_second": _finite_or_none(r.images_per_second),
                            "seconds_per_step": _finite_or_none(r.seconds_per_step),
                            "first_losses": r.losses[:10], "last_losses": r.losses[-10:],
                            "loss_curve": _curve(r.losses)}
                        for k, r in runs.items()}}
        write_json_atomic(os.path.join(args.out, "train_log.json"), log, default=float)
        print(f"wrote {path} ({seconds:.1f} s)")
    return 0


def _finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _curve(losses, points=50):
    """Loss averaged over up to ``points`` equal windows (for the log)."""
    if not losses:
        return []
    n = max(1, len(losses) // points)
    return [float(np.mean(losses[i:i + n])) for i in range(0, len(losses), n)]


# ------------------------------------------------------------------------------ parser
def _common(p, checkpoint=True):
    if checkpoint:
        p.add_argument("--checkpoint", default=None,
                       help="detector.pt / train.pt (default: the shipped textures checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="model precision when scoring (bf16 autocast on CUDA)")
    p.add_argument("--compile", default=None,
                   choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the model calls (reduce-overhead = CUDA graphs)")
    p.add_argument("--backend", default="auto", help="flow_mismatch backend")
    p.add_argument("-K", "--K", dest="k", type=int, default=None, help="noise paths (default 8)")
    p.add_argument("-T", "--T", dest="t", type=int, default=None, help="time steps (default 24)")
    p.add_argument("--agg", default=None, help="min | mean | median | quantile:a")
    p.add_argument("--smooth-sigma", dest="smooth_sigma", type=float, default=None,
                   help="Gaussian smoothing of the heatmaps in pixels (default: the detector's "
                        "setting; 0 = off, the SPEC default)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                   help="images per mismatch call")
    p.add_argument("--paths-per-call", dest="paths_per_call", type=_paths_per_call, default=None,
                   help="rows per model call: auto (2K on CPU, all elsewhere), all, or N")
    p.add_argument("--seed", type=int, default=None, help="scoring noise seed")
    p.add_argument("--threads", type=_positive(1), default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("anomaly",
                              help="flow-mismatch anomaly detection: train | score | eval",
                              description=__doc__.split("\n\n")[0].replace("``", "`"))
    sub = p.add_subparsers(dest="anomaly_command", required=True)

    from geokernels.models.velocity_unet import PRESETS

    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser("train", help="train the velocity U-Net on normal images",
                       formatter_class=fmt)
    t.add_argument("--config", default=None,
                   help="JSON file of these options (keys as in train_log.json's "
                        "metadata.options), or "
                        "the name of a config shipped in geokernels/assets (e.g. textures); "
                        "flags given on the command line override it")
    t.add_argument("--dataset", choices=DATASETS, default="textures")
    t.add_argument("--root", default=None, help="MVTec-AD / VisA folder")
    t.add_argument("--categories", nargs="*", default=None, help="default: all")
    t.add_argument("--mode", choices=("conditional", "per-category", "single", "pooled"),
                   default=None, help="one class-conditional model (default for several "
                   "categories), one model per category, or one unconditional model")
    t.add_argument("--image-size", type=_positive(8), default=128,
                   help="training resolution in pixels (the shipped textures recipe uses 64)")
    t.add_argument("--num-train", type=int, default=None, help="textures: training crops/category")
    t.add_argument("--data-seed", type=int, default=0, help="textures: dataset seed")
    t.add_argument("--holdout", type=int, default=0,
                   help="MVTec/VisA: keep the last N train images out (calibrated variant)")
    t.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                   help="VelocityUNet size (paper: the paper's scale)")
    t.add_argument("--base-width", type=int, default=None, help="override the preset's width")
    t.add_argument("--channel-mults", type=int, nargs="+", default=None,
                   help="override the preset's channel multipliers per level")
    t.add_argument("--blocks-per-level", type=int, default=None,
                   help="override the preset's residual blocks per level")
    t.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=32, help="global batch (all GPUs)")
    t.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up, then cosine")
    t.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights")
    t.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    t.add_argument("--augment", choices=("none", "flip", "flip+rot90"), default="none",
                   help="training augmentation")
    t.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    t.add_argument("--seed", type=int, default=0, help="weights and batches")
    t.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    t.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="lower --steps after a short probe so training ends within this many "
                        "minutes (split evenly over categories in per-category mode)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/train*.pt")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    t.add_argument("--compile-train", action="store_true", help="torch.compile the training step")
    t.add_argument("--threads", type=_positive(1), default=None, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--out", required=True, help="output folder (checkpoints, detector.pt, log)")
    t.set_defaults(func=_user_errors(cmd_train), _defaults={a.dest: a.default for a in t._actions})
    _record_explicit_flags(t)

    s = sub.add_parser("score", help="score image files; print one score per image",
                       formatter_class=fmt)
    s.add_argument("images", nargs="+", help="image files (resized to the model's size)")
    s.add_argument("--category", default=None,
                   help="the class to condition on (needed when the checkpoint holds several)")
    s.add_argument("--method", default="mismatch", choices=("mismatch", "reconstruction"))
    s.add_argument("--out", default=None,
                   help="folder for heatmap PNG/NPY files and scores.json (which names each "
                        "image's heatmap)")
    _common(s)
    s.set_defaults(func=_user_errors(cmd_score))

    e = sub.add_parser("eval", help="per-category metrics table, JSON and heatmap overlays",
                       formatter_class=fmt)
    e.add_argument("--dataset", choices=DATASETS, default="textures")
    e.add_argument("--root", default=None, help="MVTec-AD / VisA folder")
    e.add_argument("--categories", nargs="*", default=None, help="default: all")
    e.add_argument("--methods", nargs="+", default=["mismatch"],
                   choices=("mismatch", "reconstruction", "calibrated_mismatch"),
                   help="first one fills the top-level metrics")
    e.add_argument("--limit", type=_positive(1), default=None,
                   help="at most N normal and N defective test images per category (the "
                        "defective ones spread over the defect types)")
    e.add_argument("--calibration-images", type=_positive(1), default=40,
                   help="held-out normal images per category for calibrated_mismatch")
    e.add_argument("--report-smoothing", type=float, nargs="+", default=None, metavar="SIGMA",
                   help="also report the metrics of the heatmaps Gaussian-smoothed at each SIGMA "
                        "(non-default variants, from the same scoring pass)")
    e.add_argument("--overlays", type=_positive(0), default=4,
                   help="normal and defective images per overlay grid (0 = none)")
    e.add_argument("--out", required=True,
                   help="folder for metrics.json, metrics.md and overlays/")
    _common(e)
    e.set_defaults(func=_user_errors(cmd_eval))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="geokernels")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
