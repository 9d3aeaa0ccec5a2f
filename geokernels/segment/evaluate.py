"""Evaluating a trained segmentation model (``geokernels segment eval``).

Predictions are ``probs >= 0.5`` where probs is sigmoid(logits) (priors none/qc1/qc2/cf),
sigmoid(z) of the CFSS iterations (cfss) or the CGPM-refined probabilities (cgpm, or any model
with ``refine="cgpm"``). Metrics per image (:func:`segmentation_metrics`): Dice, IoU, HD95, BD,
BDSD (SPEC 2.6), the solidity of the predicted mask (area / convex-hull area; 1 = convex) and
of the ground truth for reference. An empty prediction (or ground truth) has no boundary: its
HD95/BD/BDSD are the image diagonal and its solidity is 0 (finite worst-case penalties, so means
stay finite and dropping an object never looks "more convex"), and ``empty_pred`` counts such
images.

Writes ``DIR/metrics.json`` (means + per-image values + settings, incl. the evaluated folder),
``DIR/metrics.md`` and ``DIR/overlays.png`` (tiles of the image with the prediction (red) and
ground-truth (green) outlines), each atomically.

CGPM refinement (SPEC 1.5) averages its loss over the batch it is given, so through Adam's
epsilon the refined masks depend slightly on ``batch_size`` (recorded in metrics.json).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from geokernels._files import write_json_atomic, write_text_atomic

METRICS = ("dice", "iou", "hd95", "bd", "bdsd", "solidity", "gt_solidity")
METRIC_TITLES = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "bd": "BD", "bdsd": "BDSD",
                 "solidity": "solidity", "gt_solidity": "GT solidity"}
REFINEMENTS = ("auto", "none", "cgpm")


def segmentation_metrics(pred, gt) -> dict[str, torch.Tensor]:
    """Per-image metrics of binary masks pred, gt (N, 1, H, W) (or (N, H, W)): a dict of float64
    tensors of shape (N,) with the keys of ``METRICS`` plus "empty_pred" (1.0 where pred is
    empty). Empty-mask distances are the image diagonal (see the module docstring)."""
    from geokernels.metrics import boundary_distance, dice, hd95, iou, solidity

    H, W = pred.shape[-2:]
    diagonal = math.hypot(H, W)
    bd, bdsd = boundary_distance(pred, gt, reduction="none", empty_distance=diagonal)
    out = {"dice": dice(pred, gt, reduction="none"), "iou": iou(pred, gt, reduction="none"),
           "hd95": hd95(pred, gt, reduction="none", empty_distance=diagonal), "bd": bd, "bdsd": bdsd,
           "solidity": solidity(pred, reduction="none"), "gt_solidity": solidity(gt, reduction="none")}
    p = torch.as_tensor(pred)
    out["empty_pred"] = (p.reshape(p.shape[0], -1) == 0).all(1).to(torch.float64)
    out["solidity"] = torch.where(out["empty_pred"].reshape(out["solidity"].shape) > 0,
                                  torch.zeros_like(out["solidity"]), out["solidity"])
    return {k: v.reshape(-1) for k, v in out.items()}


@torch.no_grad()
def predict_probs(model, cfg, images: torch.Tensor, refine: str = "none",
                  cgpm_steps: int | None = None) -> torch.Tensor:
    """Foreground probabilities (B, 1, H, W) of ``model`` (optionally CGPM-refined with the op
    backend ``cfg.backend``)."""
    from geokernels.ops import cgpm

    out = model(images)
    logits = out["logits"] if isinstance(out, dict) else out
    if refine == "cgpm":
        steps = cfg.cgpm_steps if cgpm_steps is None else cgpm_steps
        weight = cfg.prior_weight if cfg.prior == "cgpm" else 1.0
        return cgpm(logits.float(), steps=steps, weight=weight, backend=cfg.backend)
    return torch.sigmoid(logits)


def load_model(checkpoint, device=None, backend: str = "auto"):
    """(model in eval mode, TrainConfig, checkpoint dict) of a segment training checkpoint.

    The ops (CFSS iterations, CGPM) run with ``backend`` (default "auto": the best one for the
    device), not the backend the model was trained with: a model trained on a GPU evaluates on a
    CPU and the other way round."""
    from geokernels._backend import check_backend, resolve_device
    from geokernels.segment.train import TrainConfig, build_model, load_checkpoint

    check_backend(backend)
    device = resolve_device(device or "auto")
    state = load_checkpoint(checkpoint)
    cfg = TrainConfig(**{**state["config"], "backend": backend})
    model = build_model(cfg, in_channels=int(state.get("in_channels", 1)))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, state


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def write_overlays(path: str, images, preds, gts, max_images: int = 16,
                   scale: int = 2) -> str | None:
    """PNG grid of the first ``max_images`` images, 4 per row, each tile: image with the
    ground-truth outline (green) and the predicted outline (red; yellow where they coincide),
    upscaled ``scale`` x; written atomically."""
    from PIL import Image

    from geokernels._files import write_atomic

    n = min(len(images) if images is not None else 0, max_images)
    if n == 0:
        return None
    tiles = []
    for i in range(n):
        img = images[i].float().cpu().numpy()
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img.copy()
        rgb = np.clip(rgb, 0, 1) * 0.85
        g = _outline(gts[i].reshape(gts[i].shape[-2:]).cpu().numpy() > 0.5)
        p = _outline(preds[i].reshape(preds[i].shape[-2:]).cpu().numpy() > 0.5)
        rgb[g] = [0.1, 0.9, 0.1]
        rgb[p] = [1.0, 0.15, 0.1]
        rgb[g & p] = [1.0, 0.9, 0.1]
        tile = np.kron(rgb, np.ones((scale, scale, 1)))
        tiles.append(np.pad(tile, ((1, 1), (1, 1), (0, 0)), constant_values=1.0))
    cols = 4
    while len(tiles) % cols:
        tiles.append(np.ones_like(tiles[0]))
    rows = [np.concatenate(tiles[r:r + cols], axis=1) for r in range(0, len(tiles), cols)]
    grid = (np.concatenate(rows, axis=0) * 255 + 0.5).astype(np.uint8)
    return write_atomic(path, lambda fh: Image.fromarray(grid).save(fh, format="PNG"), binary=True)


def format_markdown(result: dict) -> str:
    m = result["mean"]
    keys = [k for k in METRICS if k in m]
    what = result.get("evaluated_on") or f"{result['dataset']} test set"
    n_empty = result.get("n_empty_pred", round(m.get("empty_pred", 0) * result["n_images"]))
    lines = [f"# segment eval: {what}, prior {result['prior']}"
             f" (refine {result['refine']})", "",
             f"checkpoint `{result['checkpoint']}`, {result['n_images']} images, "
             f"{n_empty} empty predictions", "",
             "| " + " | ".join(METRIC_TITLES[k] for k in keys) + " |",
             "|" + "---:|" * len(keys),
             "| " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |", ""]
    return "\n".join(lines)


def evaluate(checkpoint: str, out_dir: str | None = None, *, refine: str = "auto",
             length: int | None = None, root: str | None = None, batch_size: int = 16,
             cgpm_steps: int | None = None, overlays: int = 16, device: str | None = None,
             backend: str = "auto", progress: bool = True) -> dict:
    """Evaluate ``checkpoint`` on the test split of its dataset (or the folder ``root``).

    refine: "auto" (CGPM for a model trained with prior "cgpm", none otherwise), "none" or
    "cgpm" (refine any model's logits with CGPM). A folder model without ``root`` is evaluated
    on its ``val_root``, else (with a warning) on its training folder. ``backend``: the op
    backend of CFSS/CGPM here (see :func:`load_model`). Writes the files of the module docstring
    to ``out_dir`` (if given) and returns the result dict (``mean``, ``per_image``, settings).
    """
    import warnings

    from tqdm.auto import tqdm

    from geokernels.segment.datasets import make_dataset, materialise

    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("overlays", overlays, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    model, cfg, state = load_model(checkpoint, device, backend)
    dev = next(model.parameters()).device
    if refine == "auto":
        refine = "cgpm" if cfg.prior == "cgpm" else "none"
    evaluated_on = None
    if cfg.dataset == "folder":
        if root is None and not cfg.val_root:
            warnings.warn(f"this folder model has no --val-root: evaluating on its training "
                          f"folder {cfg.root!r} (pass --root for held-out images)", stacklevel=2)
            evaluated_on = f"training folder {cfg.root} (no --val-root)"
        root = root or cfg.val_root or cfg.root
        evaluated_on = evaluated_on or f"folder {root}"
    elif root is not None:
        raise ValueError(f"root: only --dataset folder models take --root (this model was "
                         f"trained on {cfg.dataset!r})")
    data = make_dataset(cfg.dataset, "test", size=cfg.size, length=length,
                        data_seed=cfg.data_seed, root=root, threshold=cfg.mask_threshold)
    images, masks = materialise(data, progress=progress, desc=f"{cfg.dataset} test set")
    probs = []
    for i in tqdm(range(0, images.shape[0], batch_size), desc="predict", disable=not progress,
                  leave=False):
        probs.append(predict_probs(model, cfg, images[i:i + batch_size].to(dev), refine,
                                   cgpm_steps).cpu())
    probs = torch.cat(probs)
    preds = (probs >= 0.5).to(torch.uint8)
    per = segmentation_metrics(preds, masks)
    mean = {k: float(v.mean()) for k, v in per.items()}
    result = {"checkpoint": os.fspath(checkpoint), "dataset": cfg.dataset, "prior": cfg.prior,
              "prior_weight": cfg.prior_weight, "refine": refine,
              "cgpm_steps": (cfg.cgpm_steps if cgpm_steps is None else cgpm_steps)
              if refine == "cgpm" else None,
              "root": root, "evaluated_on": evaluated_on, "batch_size": batch_size,
              "backend": backend, "train_config": {**state["config"], "steps": int(state["step"])},
              "steps_trained": int(state["step"]), "n_images": int(images.shape[0]),
              "n_empty_pred": int(per["empty_pred"].sum()), "mean": mean,
              "per_image": [{"index": i, **{k: float(v[i]) for k, v in per.items()}}
                            for i in range(images.shape[0])]}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(os.path.join(out_dir, "metrics.json"), result)
        write_text_atomic(os.path.join(out_dir, "metrics.md"), format_markdown(result))
        if overlays > 0:
            result["overlays"] = write_overlays(os.path.join(out_dir, "overlays.png"), images,
                                                preds, masks, max_images=overlays)
    return result
