"""The four stages of ``geokernels demo``: each runs one part of the library on embedded data.

A stage is a function ``stage(ctx: StageContext) -> StageResult``. It reports progress through
``ctx.bar`` (one tqdm bar per stage), saves its figures with ``ctx.save_figure`` and returns flat
metrics (finite numbers and short strings: they become the stage's section of summary.json),
tables and notes for the HTML report. A stage that cannot run raises: ``StageError`` for an
expected cause (a missing checkpoint, an op this build lacks; the message says what to do), any
other exception for a bug. Whatever a stage put in ``ctx.result`` before failing (metrics,
figures) is kept in the report next to the error.

``STAGES`` maps section names (the keys of summary.json) to stage functions, in run order.

Work sizes are fixed per (device type, quick) so results are reproducible: "quick" is a smoke
test (tiny images, seconds), the default fits the whole demo in < 5 minutes on a 2-core CPU,
and CUDA runs the SPEC's default settings on more images.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import time
from typing import Callable

import numpy as np
import torch


# ------------------------------------------------------------------------------ plumbing
class StageError(RuntimeError):
    """A stage cannot run here, for a reason the message explains (not a bug)."""


@dataclasses.dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list]


@dataclasses.dataclass
class FigureRef:
    path: str      # relative to the report folder
    caption: str


@dataclasses.dataclass
class StageResult:
    metrics: dict = dataclasses.field(default_factory=dict)
    figures: list[FigureRef] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StageContext:
    """What a stage needs: where to write, on which device, how big, and how to show progress."""
    out_dir: str
    device: torch.device
    quick: bool
    progress: bool = True
    checkpoint: str | None = None   # detector checkpoint (None: the shipped one)
    name: str = ""
    position: int = 0               # "[i/n]" in the bar's label
    count: int = 4
    result: StageResult = dataclasses.field(default_factory=StageResult)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def bar(self, total: int, unit: str = "step"):
        """The stage's progress bar (tqdm; silent when progress is off)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"[{self.position}/{self.count}] {self.name}", unit=unit,
                    disable=not self.progress, leave=True, dynamic_ncols=True)

    def save_figure(self, fig, filename: str, caption: str) -> str:
        """Write a matplotlib Figure as PNG under figures/ and list it in the stage's result."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        rel = f"figures/{filename}"
        os.makedirs(os.path.join(self.out_dir, "figures"), exist_ok=True)
        FigureCanvasAgg(fig)
        fig.savefig(os.path.join(self.out_dir, rel), dpi=100, facecolor="white")
        self.result.figures.append(FigureRef(rel, caption))
        return rel


NO_MATPLOTLIB_NOTE = ("Figures not drawn: matplotlib is not installed (pip install matplotlib); "
                      "the stage's metrics and tables are complete.")


def _figure(draw):
    """Figures are optional: without matplotlib a figure function draws nothing and the stage
    notes it once, keeping its metrics and tables (a GPU image may lack matplotlib)."""
    @functools.wraps(draw)
    def wrapper(ctx, *args, **kwargs):
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            if NO_MATPLOTLIB_NOTE not in ctx.result.notes:
                ctx.result.notes.append(NO_MATPLOTLIB_NOTE)
            return None
        return draw(ctx, *args, **kwargs)
    return wrapper


def _new_figure(width: float, height: float):
    """A matplotlib Figure drawn with the Agg canvas: no pyplot, no global backend change."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _off(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _require(name: str, branch_hint: str):
    """``geokernels.<name>``, or StageError saying which part of the library is missing."""
    import geokernels

    fn = getattr(geokernels, name, None)
    if fn is None:
        raise StageError(f"geokernels.{name} is not available in this build ({branch_hint}); "
                         f"update geokernels to a version that includes it")
    return fn


# ------------------------------------------------------------------------------ anomaly
# Flow-matching scoring costs K*T velocity-model calls per image. The SPEC defaults (K=8, T=24)
# run on CUDA; on a CPU the demo uses fewer paths and times and fewer images so the stage takes
# about a minute on 2 cores with the shipped 64-px model (the detector's scores stay comparable across images of a run).
ANOMALY_SETTINGS = {
    # (device type, quick): detector settings and images per category
    ("cuda", False): dict(K=8, T=24, batch_size=8, n_good=20, n_defective=30, show=6),
    ("cpu", False): dict(K=4, T=12, batch_size=8, n_good=6, n_defective=9, show=5),
    ("cuda", True): dict(K=2, T=2, batch_size=4, n_good=2, n_defective=3, show=2),
    ("cpu", True): dict(K=1, T=2, batch_size=4, n_good=2, n_defective=3, show=2),
}


def _load_detector(ctx: StageContext, settings: dict):
    try:
        from geokernels.models.detector import FlowMismatchDetector
    except ImportError as exc:
        raise StageError(f"the flow-matching detector (geokernels.models.detector) is not part "
                         f"of this build: {exc}") from None
    opts = dict(device=ctx.device, K=settings["K"], T=settings["T"],
                batch_size=settings["batch_size"])
    try:
        if ctx.checkpoint:
            return FlowMismatchDetector.load(ctx.checkpoint, **opts), os.fspath(ctx.checkpoint)
        return FlowMismatchDetector.pretrained(**opts), "shipped textures checkpoint"
    except FileNotFoundError as exc:   # never train or fake a detector here: say what to do
        raise StageError(f"{exc}; or point the demo at a detector checkpoint with "
                         f"`geokernels demo --checkpoint PATH`") from None
    except ValueError as exc:   # CheckpointError: corrupt or foreign file
        raise StageError(f"cannot load the detector checkpoint: {exc}") from None


def run_anomaly(ctx: StageContext) -> StageResult:
    """Score the offline texture test set with the shipped flow-matching detector."""
    from geokernels.data import TEXTURE_CATEGORIES, TextureAnomalyDataset
    from geokernels.metrics import AnomalyMetricAccumulator

    settings = ANOMALY_SETTINGS[(ctx.device.type, ctx.quick)]
    det, source = _load_detector(ctx, settings)
    model = next(iter(det.members.values()))
    size = int(model.config.get("image_size") or 128)
    if model.in_channels != 3:
        raise StageError(f"the detector expects {model.in_channels}-channel images; the texture "
                         f"set is RGB")
    if det.categories is None:      # one category-agnostic model: score every texture with it
        categories = [(c, None) for c in TEXTURE_CATEGORIES]
    else:
        categories = [(c, c) for c in det.categories if c in TEXTURE_CATEGORIES]
        if not categories:
            raise StageError(f"the detector knows categories {det.categories}, none of which is "
                             f"a texture category {TEXTURE_CATEGORIES}")
    if ctx.quick:
        categories = categories[:1]
    per_image = settings["n_good"] + settings["n_defective"]
    bar = ctx.bar(len(categories) * per_image, unit="img")
    res = ctx.result
    rows, shown = [], []
    all_scores = {}
    totals = AnomalyMetricAccumulator()
    for category, det_category in categories:
        ds = TextureAnomalyDataset(category, "test", size=size, seed=0,
                                   num_test_good=settings["n_good"],
                                   num_test_defective=settings["n_defective"])
        samples = [ds[i] for i in range(len(ds))]
        images = torch.stack([s["image"] for s in samples])
        masks = torch.stack([s["mask"][0] for s in samples])
        labels = torch.tensor([s["label"] for s in samples])
        # one call per category (its own inner progress bar): the noise of an image is keyed
        # by its index in the call, as in `geokernels anomaly eval`
        heat, score = det.score(images, category=det_category, progress=ctx.progress)
        bar.update(len(samples))
        acc = AnomalyMetricAccumulator()
        acc.update(heatmaps=heat, masks=masks, image_scores=score, image_labels=labels)
        totals.update(heatmaps=heat, masks=masks, image_scores=score, image_labels=labels)
        m = acc.compute()
        rows.append([category, m["image_auroc"], m["pixel_auroc"], m["aupro"],
                     len(samples), int(labels.sum())])
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            res.metrics[f"{category}.{key}"] = m[key]
        all_scores[category] = (score, labels, [s["defect"] for s in samples])
        shown.append((category, images, masks, heat, score, [s["defect"] for s in samples]))
    bar.close()
    pooled = totals.compute()
    # MVTec convention: the headline numbers are means over categories
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        res.metrics[key] = float(np.mean([res.metrics[f"{c}.{key}"] for c, _ in categories]))
    res.metrics.update({
        "pooled.image_auroc": pooled["image_auroc"], "pooled.pixel_auroc": pooled["pixel_auroc"],
        "pooled.aupro": pooled["aupro"], "images": sum(r[4] for r in rows),
        "defective_images": sum(r[5] for r in rows), "image_size": size, "K": det.settings["K"],
        "T": det.settings["T"], "checkpoint": source,
    })
    mean = ["mean", res.metrics["image_auroc"], res.metrics["pixel_auroc"], res.metrics["aupro"],
            res.metrics["images"], res.metrics["defective_images"]]
    res.tables.append(Table("Flow Mismatching on the offline texture test set",
                            ["category", "image AUROC", "pixel AUROC", "AUPRO (FPR 0.3)",
                             "images", "defective"], rows + [mean]))
    res.notes.append(
        f"Detector: {source}; K={det.settings['K']} noise paths x T={det.settings['T']} times, "
        f"agg={det.settings['agg']!r}, weight t^{det.settings['r']:g}"
        + ((" (fewer than the SPEC defaults K=8, T=24: quick mode)" if ctx.quick else
            " (fewer than the SPEC defaults K=8, T=24 to fit the CPU time budget)")
           if (det.settings["K"], det.settings["T"]) != (8, 24) else "")
        + f". Test images: {settings['n_good']} normal + {settings['n_defective']} defective "
        f"crops per category ({size} px), texture photos shipped with scikit-image and "
        f"synthetic defects (foreign texture, scratch, spot).")
    _anomaly_figures(ctx, shown, settings["show"])
    _score_figure(ctx, all_scores)
    return res


@_figure
def _anomaly_figures(ctx, shown, n_show):
    """Rows per category: the image (ground-truth outline in green) over its heatmap overlay."""
    cols = []
    for category, images, masks, heat, score, defects in shown:
        kinds = sorted({d for d in defects if d != "good"})
        normal = [i for i, d in enumerate(defects) if d == "good"]
        normal = normal[:max(1, n_show - len(kinds))]
        # one image of each defect type first, then more of them in order
        firsts = [defects.index(k) for k in kinds]
        rest = [i for i, d in enumerate(defects) if d != "good" and i not in firsts]
        cols.append(normal + (firsts + rest)[:max(0, n_show - len(normal))])
    ncols = max(len(c) for c in cols)
    fig = _new_figure(1.7 * ncols + 0.6, 3.5 * len(shown))
    grid = fig.subplots(2 * len(shown), ncols, squeeze=False)
    for r, ((category, images, masks, heat, score, defects), idx) in enumerate(zip(shown, cols)):
        normal_heat = heat[[i for i, d in enumerate(defects) if d == "good"]]
        # one colour scale per category: from the normal images' median to a high percentile of
        # all maps, so normal images look cold and defects stand out
        lo = float(normal_heat.median()) if normal_heat.numel() else float(heat.min())
        hi = float(torch.quantile(heat.flatten()[::max(1, heat.numel() // 1_000_000)], 0.999))
        hi = max(hi, lo + 1e-12)
        for c in range(ncols):
            top, bottom = grid[2 * r, c], grid[2 * r + 1, c]
            _off(top)
            _off(bottom)
            if c >= len(idx):
                top.set_visible(False)
                bottom.set_visible(False)
                continue
            i = idx[c]
            img = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
            top.imshow(img, interpolation="nearest")
            if masks[i].any():
                top.contour(masks[i].numpy(), levels=[0.5], colors="lime", linewidths=0.8)
            top.set_title(f"{category}: {defects[i]}", fontsize=8)
            bottom.imshow(img, interpolation="nearest")
            im = bottom.imshow(heat[i].numpy(), cmap="inferno", alpha=0.6, vmin=lo, vmax=hi,
                               interpolation="bilinear")
            bottom.set_title(f"score {float(score[i]):.3g}", fontsize=8)
            if c == 0:
                top.set_ylabel("image + defect", fontsize=8)
                bottom.set_ylabel("mismatch heatmap", fontsize=8)
        fig.colorbar(im, ax=grid[2 * r + 1, :].tolist(), shrink=0.8, label="H(p)")
    ctx.save_figure(fig, "anomaly_heatmaps.png",
                    "Flow-mismatch heatmaps (bottom rows; colour scale per category) of normal "
                    "and defective test crops; ground-truth defects outlined in green (top rows).")


@_figure
def _score_figure(ctx, all_scores):
    fig = _new_figure(2.4 * len(all_scores) + 0.6, 3.0)
    axes = fig.subplots(1, len(all_scores), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, (category, (score, labels, defects)) in zip(axes, all_scores.items()):
        kinds = ["good"] + sorted({d for d in defects if d != "good"})
        for x, kind in enumerate(kinds):
            vals = np.array([float(s) for s, d in zip(score, defects) if d == kind])
            ax.scatter(x + rng.uniform(-0.15, 0.15, len(vals)), vals, s=14,
                       color="tab:blue" if kind == "good" else "tab:red", alpha=0.8)
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([k.replace("_", "\n") for k in kinds], fontsize=7)
        ax.set_title(category, fontsize=9)
        if float(score.min()) > 0 and float(score.max()) > 20 * float(score.min()):
            ax.set_yscale("log")   # only for a wide range: a narrow one reads better linear
    axes[0].set_ylabel("image score")
    ctx.save_figure(fig, "anomaly_scores.png",
                    "Image anomaly scores per category: normal crops (blue) and each defect type "
                    "(red). A perfect detector puts every red point above every blue one.")


# ------------------------------------------------------------------------------ convexity
# Midpoint convexification is local: a concavity wider than about 2 * radius is only filled by
# slow propagation that stalls on the pixel grid (radius 4 leaves the notebook shape unchanged),
# so the demo uses the paper's wide window (radius 15, 708 offsets: ~1.5 s for six 128 px masks
# on 2 cores) and a proportionally wide one in quick mode.
CONVEXITY_SETTINGS = {
    False: dict(size=128, radius=15.0, cgpm_steps=200, cgpm_lr=2e-2, shapes=4),
    True: dict(size=48, radius=6.0, cgpm_steps=20, cgpm_lr=2e-2, shapes=1),
}


def convexity_inputs(size: int, n_shapes: int, seed: int = 0):
    """Soft masks (N, 1, size, size) in [0, 1] with concavities and noise, their names, and the
    clean convex object each came from (None for the notebook shape, whose concavity is the
    point): the paper's notebook shape (2 + n_shapes masks in all), the same with a sharp noisy
    edge, and synthetic convex objects with bites taken out of the rim plus pixel noise and
    faint spurious blobs."""
    from scipy import ndimage

    from geokernels.data import SyntheticShapes, notebook_shape
    from geokernels.data.synthetic import sector_disk_mask, signed_distance

    rng = np.random.default_rng(seed)
    radius = 0.31 * size
    book = notebook_shape(size, radius=radius).numpy()[0, 0].astype(np.float64)
    # the same pac-man with a sharp edge (2-3 px) and pixel noise: a ragged outline
    sharp = 1.0 / (1.0 + np.exp(-signed_distance(sector_disk_mask(size, radius)) / 2.0))
    masks = [book, np.clip(sharp + rng.normal(0, 0.12, book.shape), 0, 1)]
    names = ["notebook shape", "notebook, sharp edge + noise"]
    clean = [None, None]
    kinds = ("rounded_polygon", "ellipse")   # alternate: convex objects, bitten below
    shapes = {k: SyntheticShapes(length=max(1, n_shapes), size=size, seed=seed, kinds=(k,),
                                 radius=(0.28, 0.34)) for k in kinds}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for i in range(n_shapes):
        item = shapes[kinds[i % 2]].render(i)
        m = item["mask"][0].numpy() > 0.5
        cy, cx = np.argwhere(m).mean(0)
        r = math.sqrt(m.sum() / math.pi)
        bitten = m.copy()
        for _ in range(2):  # bites: disks centred on the rim, a concavity each
            phi = rng.uniform(0, 2 * math.pi)
            s = r * rng.uniform(0.35, 0.5)
            by, bx = cy + r * math.sin(phi), cx + r * math.cos(phi)
            bitten &= (yy - by) ** 2 + (xx - bx) ** 2 > s * s
        soft = ndimage.gaussian_filter(bitten.astype(np.float64), 1.0)
        soft = soft + rng.normal(0, 0.08, soft.shape)
        for _ in range(3):  # faint spurious blobs (below 0.5) around the object
            py, px = rng.uniform(0, size, 2)
            soft += 0.3 * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * (0.02 * size) ** 2))
        masks.append(np.clip(soft, 0, 1))
        names.append(f"{item['kind'].replace('_', ' ')} with bites + noise")
        clean.append(m)
    u = torch.from_numpy(np.stack(masks)[:, None]).to(torch.float32)
    return u, names, clean


def run_convexity(ctx: StageContext) -> StageResult:
    """Midpoint convexification (SPEC 1.6) and CGPM (SPEC 1.5) of concave, noisy soft masks."""
    import geokernels
    from geokernels.metrics import dice, solidity

    s = CONVEXITY_SETTINGS[ctx.quick]
    u, names, clean = convexity_inputs(s["size"], s["shapes"])
    cgpm = getattr(geokernels, "cgpm", None)
    bar = ctx.bar(len(names) * 2)
    res = ctx.result
    u = u.to(ctx.device)
    outputs = {"input": u.cpu()}
    sweeps = []
    for i in range(len(names)):   # one plane at a time: each its own sweep count
        out, n = geokernels.midpoint_convexify(u[i:i + 1], radius=s["radius"], max_iters=10_000,
                                               tol=0.0, return_sweeps=True)
        sweeps.append(n)
        outputs.setdefault("midpoint", []).append(out.cpu())
        bar.update()
    outputs["midpoint"] = torch.cat(outputs["midpoint"])
    missing = None
    if cgpm is None:
        missing = ("geokernels.cgpm is not available in this build (the D-Convexity CGPM op); "
                   "only midpoint convexification ran")
    else:
        refined = []
        for i in range(len(names)):   # CGPM's loss means run over the batch: one mask per call
            logits = torch.logit(u[i:i + 1].clamp(1e-4, 1 - 1e-4))
            refined.append(cgpm(logits, steps=s["cgpm_steps"], lr=s["cgpm_lr"]).cpu())
            bar.update()
        outputs["cgpm"] = torch.cat(refined)
    bar.close()
    methods = [k for k in ("input", "midpoint", "cgpm") if k in outputs]
    binary = {k: outputs[k] > 0.5 for k in methods}
    sol = {k: solidity(binary[k], reduction="none").reshape(-1) for k in methods}
    rows = []
    for i, name in enumerate(names):
        row = [name] + [float(sol[k][i]) for k in methods]
        if clean[i] is not None:
            gt = torch.from_numpy(clean[i])
            row += [float(dice(binary[k][i, 0], gt)) for k in methods]
        else:
            row += ["-"] * len(methods)
        rows.append(row)
    res.metrics.update({
        "solidity_before": float(sol["input"].mean()),
        "midpoint.solidity_after": float(sol["midpoint"].mean()),
        "midpoint.radius": s["radius"],
        "midpoint.sweeps_mean": float(np.mean(sweeps)),
        "masks": len(names), "size": s["size"],
    })
    if "cgpm" in outputs:
        res.metrics.update({"cgpm.solidity_after": float(sol["cgpm"].mean()),
                            "cgpm.steps": s["cgpm_steps"], "cgpm.lr": s["cgpm_lr"]})
    with_gt = [i for i in range(len(names)) if clean[i] is not None]
    if with_gt:
        for k in methods:
            key = "dice_to_clean_before" if k == "input" else f"{k}.dice_to_clean"
            res.metrics[key] = float(np.mean([rows[i][1 + len(methods) + methods.index(k)]
                                              for i in with_gt]))
    titles = {"input": "input", "midpoint": "midpoint convexify", "cgpm": "CGPM"}
    res.tables.append(Table(
        "Solidity (area / convex-hull area of {u > 0.5}; 1 = convex) and Dice to the clean "
        "convex object", ["mask"] + [f"solidity {titles[k]}" for k in methods]
        + [f"Dice {titles[k]}" for k in methods], rows))
    res.notes.append(
        f"Midpoint convexification: radius {s['radius']:g}, iterated to its fixed point (Jacobi "
        f"sweeps, {int(min(sweeps))}-{int(max(sweeps))} sweeps). CGPM: method c2, "
        f"{s['cgpm_steps']} Adam steps, lr {s['cgpm_lr']:g}, on logit(u).")
    _convexity_figure(ctx, names, methods, titles, outputs, sol)
    if missing:
        raise StageError(missing)
    return res


@_figure
def _convexity_figure(ctx, names, methods, titles, outputs, sol):
    fig = _new_figure(2.0 * len(methods) + 0.4, 2.0 * len(names) + 0.3)
    grid = fig.subplots(len(names), len(methods), squeeze=False)
    for i, name in enumerate(names):
        for c, k in enumerate(methods):
            ax = grid[i, c]
            _off(ax)
            ax.imshow(outputs[k][i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.contour(outputs[k][i, 0].numpy(), levels=[0.5], colors="tab:red", linewidths=0.8)
            ax.set_title(f"{titles[k]}\nsolidity {float(sol[k][i]):.3f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    ctx.save_figure(fig, "convexity.png",
                    "Soft masks before (left) and after midpoint convexification and CGPM; the red "
                    "line is the 0.5 level whose solidity is given.")


# ------------------------------------------------------------------------------ contour flow
CONTOUR_FLOW_SETTINGS = {
    # the CFSS paper's noisy-shape study (as in geokernels.experiments.cfss_noise)
    False: dict(size=96, n_images=6, noise=(1.0, 1.5, 2.0), show_noise=1.5, iters=50,
                eps=0.5, tau=0.5, lam=1.0, sigma=2.0, halfsize=2),
    True: dict(size=32, n_images=2, noise=(1.5,), show_noise=1.5, iters=10,
               eps=0.5, tau=0.5, lam=1.0, sigma=2.0, halfsize=2),
}


def run_contour_flow(ctx: StageContext) -> StageResult:
    """Noisy shapes -> CFSS iterations with the ground-truth contour flow (SPEC 2.2, 2.4)."""
    import geokernels
    from geokernels.data import SyntheticShapes
    from geokernels.metrics import boundary_distance, dice

    cfss_iterate = _require("cfss_iterate", "the Contour-Flow CFSS iterations op")
    s = CONTOUR_FLOW_SETTINGS[ctx.quick]
    size, n = s["size"], s["n_images"]
    shapes = SyntheticShapes(length=n, size=size, seed=1, radius=(0.25, 0.35))
    masks = torch.stack([shapes.render(i)["mask"] for i in range(n)]).to(ctx.device)
    flow = geokernels.contour_flow_field(masks)
    gen = torch.Generator().manual_seed(0)
    opts = dict(iters=s["iters"], eps=s["eps"], lam=s["lam"], sigma=s["sigma"],
                halfsize=s["halfsize"])
    diag = math.hypot(size, size)  # BD of an empty prediction: the image diagonal, not inf
    res = ctx.result
    rows, shown = [], None
    bar = ctx.bar(len(s["noise"]) * 2)
    for level in s["noise"]:
        noise = torch.randn(masks.shape, generator=gen).to(ctx.device)
        o = (2 * masks - 1) + level * noise
        with torch.no_grad():
            z_smooth = cfss_iterate(o, flow, tau=0.0, **opts)
            bar.update()
            z_cfss = cfss_iterate(o, flow, tau=s["tau"], **opts)
            bar.update()
        preds = {"noisy": o > 0, "smoothing": z_smooth > 0, "cfss": z_cfss > 0}
        row = [level]
        for key, p in preds.items():
            d = float(dice(p.cpu(), masks.cpu()))
            bd, _ = boundary_distance(p.cpu(), masks.cpu(), empty_distance=diag)
            res.metrics[f"noise{level:g}.{key}.dice"] = d
            res.metrics[f"noise{level:g}.{key}.bd"] = float(bd)
            row += [d, float(bd)]
        rows.append(row)
        if level == s["show_noise"]:
            shown = {k: v.cpu() for k, v in preds.items()}
    bar.close()
    key = f"noise{s['show_noise']:g}"
    res.metrics.update({
        "dice_before": res.metrics[f"{key}.noisy.dice"],
        "dice_after": res.metrics[f"{key}.cfss.dice"],
        "bd_before": res.metrics[f"{key}.noisy.bd"],
        "bd_after": res.metrics[f"{key}.cfss.bd"],
        "noise_std": s["show_noise"], "images": n, "size": size, "iters": s["iters"],
    })
    res.tables.append(Table(
        "Dice (higher is better) and boundary distance BD in pixels (lower is better), mean over "
        f"{n} shapes", ["noise std", "Dice threshold", "BD threshold", "Dice smoothing only",
                        "BD smoothing only", "Dice CFSS", "BD CFSS"], rows))
    res.notes.append(
        f"Logits o = (2m - 1) + noise * N(0, 1) from {n} synthetic {size}x{size} shapes; CFSS: "
        f"{s['iters']} iterations (eps {s['eps']:g}, tau {s['tau']:g}, lam {s['lam']:g}, "
        f"Gaussian sigma {s['sigma']:g}) with the ground-truth contour flow of each mask; "
        f"'smoothing only' is the same iteration without the flow constraint (tau = 0).")
    _contour_flow_figure(ctx, masks.cpu(), flow.cpu(), shown, s["show_noise"])
    return res


@_figure
def _contour_flow_figure(ctx, masks, flow, preds, level):
    from geokernels.metrics import dice

    n = min(3, masks.shape[0])
    cols = [("ground truth + flow", None), (f"threshold (noise {level:g})", "noisy"),
            ("smoothing only", "smoothing"), ("CFSS (GT flow)", "cfss")]
    fig = _new_figure(2.0 * len(cols), 2.1 * n + 0.2)
    grid = fig.subplots(n, len(cols), squeeze=False)
    size = masks.shape[-1]
    step = max(1, size // 16)
    yy, xx = np.mgrid[0:size:step, 0:size:step]
    for i in range(n):
        gt = masks[i, 0].numpy()
        for c, (title, key) in enumerate(cols):
            ax = grid[i, c]
            _off(ax)
            if key is None:
                ax.imshow(gt, cmap="gray", vmin=0, vmax=1)
                f0 = flow[i, 0].numpy()[::step, ::step]
                f1 = flow[i, 1].numpy()[::step, ::step]
                # channel 0 pairs with rows (y, down), channel 1 with columns (x, right)
                ax.quiver(xx, yy, f1, -f0, color="tab:orange", scale=size / step * 1.2,
                          width=0.006)
                ax.set_title(title, fontsize=8)
            else:
                p = preds[key][i, 0]
                ax.imshow(p.numpy(), cmap="gray", vmin=0, vmax=1)
                ax.contour(gt, levels=[0.5], colors="tab:green", linewidths=0.7)
                ax.set_title(f"{title}\nDice {float(dice(p, masks[i, 0])):.3f}", fontsize=8)
    ctx.save_figure(fig, "contour_flow.png",
                    "Noisy shapes segmented by thresholding, by smoothing only, and by CFSS with "
                    "the ground-truth contour flow (left, orange arrows); green: true outline.")


# ------------------------------------------------------------------------------ kernels
KERNEL_SETTINGS = {
    # every op with a benchmark case; ops still waiting when the stage has run budget_s seconds
    # are listed as skipped (the full table: `geokernels bench`)
    False: dict(min_time=0.2, ops=None, budget_s=100.0),
    # quick: two cheap ops only (a smoke test of the stage, not a measurement)
    True: dict(min_time=0.02, ops=("qc2_loss", "distance_transform"), budget_s=60.0),
}


def run_kernels(ctx: StageContext) -> StageResult:
    """Each op's fused backends against the reference on this machine (benchmark quick cases)."""
    from geokernels import _backend, benchmark

    s = KERNEL_SETTINGS[ctx.quick]
    ops = sorted(_backend.registered_ops())
    if s["ops"] is not None:
        ops = [op for op in ops if op in s["ops"]]
    res = ctx.result
    bar = ctx.bar(len(ops), unit="op")
    rows, headline, skipped, broken = [], [], [], []
    load_before = _load_average()
    started = time.perf_counter()
    for op in ops:
        if time.perf_counter() - started > s["budget_s"]:
            skipped.append(op)
            bar.update()
            continue
        try:
            results = benchmark.run(ctx.device, ops=[op], quick=True, compile_reference=False,
                                    memory=True, min_time=s["min_time"], progress=False)
        except benchmark.UnknownOpError:   # a backend but no bench case: say so, go on
            results = []
        bar.update()
        if not results:
            res.notes.append(f"{op}: no benchmark case registered")
            continue
        first_label = results[0].label
        for r in results:
            rows.append([r.op, r.label, r.impl, r.ms, r.speedup_vs_reference, r.peak_mb,
                         r.note or ""])
            if (r.label != first_label or r.impl == "reference" or not math.isfinite(r.ms)
                    or benchmark.mismatched(r)):
                continue
            ref = next(x for x in results if x.label == r.label and x.impl == "reference")
            headline.append((op, r.impl, r.speedup_vs_reference, ref.peak_mb, r.peak_mb))
            res.metrics[f"{op}.case"] = first_label
            res.metrics[f"{op}.reference_ms"] = ref.ms
            res.metrics[f"{op}.{r.impl}_ms"] = r.ms
            if r.speedup_vs_reference is not None:
                res.metrics[f"{op}.{r.impl}_speedup"] = r.speedup_vs_reference
            if ref.peak_mb is not None:
                res.metrics[f"{op}.reference_peak_mb"] = ref.peak_mb
            if r.peak_mb is not None:
                res.metrics[f"{op}.{r.impl}_peak_mb"] = r.peak_mb
        failed = [r for r in results if not math.isfinite(r.ms) or benchmark.mismatched(r)]
        for r in failed:
            res.notes.append(f"{op} [{r.label}] {r.impl} failed: {r.note}")
            res.metrics[f"{op}.{r.impl}_error"] = r.note
            if r.impl != "reference":
                broken.append(f"{op} ({r.impl}): {r.note}")
    bar.close()
    if skipped:
        res.notes.append(f"Not timed (the stage's {s['budget_s']:.0f} s budget was spent): "
                         f"{', '.join(skipped)}; run `geokernels bench --quick --ops "
                         f"{' '.join(skipped)}`.")
        res.metrics["skipped_ops"] = ", ".join(skipped)
    if not headline:
        raise StageError("no fused backend could be timed (is the C++ extension built? see "
                         "`geokernels info`)")
    speedups = [h[2] for h in headline if h[2] is not None]
    res.metrics.update({
        "device": str(ctx.device), "ops": len({h[0] for h in headline}),
        "speedup_geomean": float(np.exp(np.mean(np.log(speedups)))) if speedups else 0.0,
    })
    res.tables.append(Table(
        "Median step time (forward + backward where the op has one), speed-up over the "
        "pure-PyTorch reference, and peak memory allocated by torch during one step",
        ["op", "case", "implementation", "ms", "x reference", "peak MB", "note"], rows))
    res.notes.append(
        f"Benchmark cases of `geokernels bench --quick` on {ctx.device} (small sizes; the full "
        f"table: `geokernels bench`). CPU peak memory comes from the torch profiler.")
    busy = _busy_note(load_before, _load_average())
    if busy:
        res.notes.append(busy)
        res.metrics["load_average"] = max(load_before or 0.0, _load_average() or 0.0)
    _kernel_figure(ctx, headline)
    if broken:   # a wrong or crashing kernel is a failure, not a row that quietly drops out
        raise StageError(f"{len(broken)} fused row(s) failed or differ from the reference: "
                         + "; ".join(broken))
    return res


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy_note(*loads) -> str | None:
    """A warning when other work shared the CPUs while the kernels were timed: the reference's
    multi-threaded PyTorch ops suffer far more from it than the fused kernels, so speed-ups
    measured on a busy machine swing by 10-100x between runs."""
    cores = os.cpu_count() or 1
    worst = max((x for x in loads if x is not None), default=None)
    # this process alone keeps up to `cores` threads busy: flag only load beyond that
    if worst is None or worst <= cores + max(1.0, 0.25 * cores):
        return None
    return (f"The machine was busy while timing (load average {worst:.1f} on {cores} cores): "
            f"timings and speed-ups are unreliable; rerun on an idle machine.")


@_figure
def _kernel_figure(ctx, headline):
    labels = [f"{op} ({impl})" for op, impl, *_ in headline]
    speed = [h[2] or float("nan") for h in headline]
    mem = [(h[3] / h[4]) if h[3] and h[4] else float("nan") for h in headline]
    fig = _new_figure(9.0, 0.45 * len(labels) + 1.4)
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(labels))
    ax1.barh(y, speed, color="tab:blue")
    ax1.axvline(1.0, color="black", linewidth=0.8)
    ax1.set_xscale("log")
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("speed-up over the reference (x, log)")
    for yi, v in zip(y, speed):
        if math.isfinite(v):
            ax1.text(v, yi, f" {v:.1f}x", va="center", fontsize=7)
    ax2.barh(y, mem, color="tab:green")
    ax2.axvline(1.0, color="black", linewidth=0.8)
    ax2.set_xscale("log")
    ax2.set_xlabel("peak memory: reference / fused (x, log)")
    for yi, v in zip(y, mem):
        if math.isfinite(v):
            ax2.text(v, yi, f" {v:.1f}x", va="center", fontsize=7)
    ctx.save_figure(fig, "kernels.png",
                    f"Fused backends against the pure-PyTorch reference on {ctx.device} "
                    f"(first benchmark case of each op; > 1 means faster / leaner).")


# ------------------------------------------------------------------------------ registry
STAGES: dict[str, Callable[[StageContext], StageResult]] = {
    "anomaly": run_anomaly,
    "convexity": run_convexity,
    "contour_flow": run_contour_flow,
    "kernels": run_kernels,
}
