"""Evaluating a trained segmentation model (``geokernels segment eval``).

Predictions are ``probs >= 0.5`` where probs is sigmoid(logits) (priors none/qc1/qc2/cf),
sigmoid(z) of the CFSS iterations (cfss) or the CGPM-refined probabilities (cgpm, or any model
with ``refine="cgpm"``). Metrics per image (:func:`segmentation_metrics`): Dice, IoU, HD95, BD,
BDSD (SPEC 2.6), the solidity of the predicted mask (area / convex-hull area; 1 = convex) and
of the ground truth for reference. An empty prediction (or ground truth) has no boundary: its
HD95/BD/BDSD are the image diagonal (a finite worst-case penalty, so means stay finite), and
``empty_pred`` counts such images.

Writes ``DIR/metrics.json`` (means + per-image values + settings), ``DIR/metrics.md`` and
``DIR/overlays.png`` (rows of: image | prediction (red) and ground-truth (green) outlines).
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
    return {k: v.reshape(-1) for k, v in out.items()}


@torch.no_grad()
def predict_probs(model, cfg, images: torch.Tensor, refine: str = "none",
                  cgpm_steps: int | None = None) -> torch.Tensor:
    """Foreground probabilities (B, 1, H, W) of ``model`` (optionally CGPM-refined)."""
    from geokernels.ops import cgpm

    out = model(images)
    logits = out["logits"] if isinstance(out, dict) else out
    if refine == "cgpm":
        steps = cfg.cgpm_steps if cgpm_steps is None else cgpm_steps
        weight = cfg.prior_weight if cfg.prior == "cgpm" else 1.0
        return cgpm(logits.float(), steps=steps, weight=weight, backend=cfg.backend)
    return torch.sigmoid(logits)


def load_model(checkpoint, device=None):
    """(model in eval mode, TrainConfig, checkpoint dict) of a segment training checkpoint."""
    from geokernels.segment.train import TrainConfig, build_model, load_checkpoint

    state = load_checkpoint(checkpoint)
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg, in_channels=int(state.get("in_channels", 1)))
    model.load_state_dict(state["model"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), cfg, state


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def write_overlays(path: str, images, preds, gts, max_rows: int = 16, scale: int = 2) -> str | None:
    """PNG grid, 4 images per row, each tile: image with the ground-truth outline (green) and the
    predicted outline (red; yellow where they coincide), upscaled ``scale`` x."""
    from PIL import Image

    n = min(len(images) if images is not None else 0, max_rows * 4)
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def format_markdown(result: dict) -> str:
    m = result["mean"]
    keys = [k for k in METRICS if k in m]
    lines = [f"# segment eval: {result['dataset']} test set, prior {result['prior']}"
             f" (refine {result['refine']})", "",
             f"checkpoint `{result['checkpoint']}`, {result['n_images']} images, "
             f"{int(m.get('empty_pred', 0) * result['n_images'])} empty predictions", "",
             "| " + " | ".join(METRIC_TITLES[k] for k in keys) + " |",
             "|" + "---:|" * len(keys),
             "| " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |", ""]
    return "\n".join(lines)


def evaluate(checkpoint: str, out_dir: str | None = None, *, refine: str = "auto",
             length: int | None = None, root: str | None = None, batch_size: int = 16,
             cgpm_steps: int | None = None, overlays: int = 16, device: str | None = None,
             progress: bool = True) -> dict:
    """Evaluate ``checkpoint`` on the test split of its dataset (or the folder ``root``).

    refine: "auto" (CGPM for a model trained with prior "cgpm", none otherwise), "none" or
    "cgpm" (refine any model's logits with CGPM). Writes the files of the module docstring to
    ``out_dir`` (if given) and returns the result dict (``mean``, ``per_image``, settings).
    """
    from tqdm.auto import tqdm

    from geokernels.segment.datasets import make_dataset, materialise

    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    model, cfg, state = load_model(checkpoint, device)
    dev = next(model.parameters()).device
    if refine == "auto":
        refine = "cgpm" if cfg.prior == "cgpm" else "none"
    if cfg.dataset == "folder":
        root = root or cfg.val_root or cfg.root
    elif root is not None:
        raise ValueError(f"root: only --dataset folder models take --root (this model was "
                         f"trained on {cfg.dataset!r})")
    data = make_dataset(cfg.dataset, "test", size=cfg.size, length=length,
                        data_seed=cfg.data_seed, root=root)
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
              "steps_trained": int(state["step"]), "n_images": int(images.shape[0]), "mean": mean,
              "per_image": [{"index": i, **{k: float(v[i]) for k, v in per.items()}}
                            for i in range(images.shape[0])]}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(os.path.join(out_dir, "metrics.json"), result)
        write_text_atomic(os.path.join(out_dir, "metrics.md"), format_markdown(result))
        if overlays > 0:
            result["overlays"] = write_overlays(os.path.join(out_dir, "overlays.png"), images,
                                                preds, masks, max_rows=max(1, overlays // 4))
    return result
