"""Training a segmentation U-Net with a shape prior (``geokernels segment train``).

Objective per prior (``W`` = ``prior_weight``; ``base`` = BCE-with-logits, soft Dice or both,
``base_loss``; by default BCE for cf and cfss, as SPEC 2.3/2.5 train them, BCE + Dice otherwise):

=========  ==================================================================================
none       ``base(logits, mask)``
qc1        ``base + W * qc1_loss(sigmoid(logits))``                      (SPEC 1.3, window 7)
qc2        ``base + W * qc2_loss(sigmoid(logits))``                      (SPEC 1.2)
cgpm       ``base`` in training; at evaluation the logits are refined by CGPM (SPEC 1.5) with
           ``weight = W``, ``steps = cgpm_steps``: the parameter-free module is an inference-time
           projection, so a "cgpm" model is trained exactly like "none" (same budget)
cf         ``(1 - W) * base + W * contour_flow_loss(logits, F_gt)``      (SPEC 2.3: lambda * BCE +
           (1 - lambda) * L with lambda = 1 - W = 0.4 by default; 0 <= W <= 1; F_gt = the
           ground-truth contour flow of the mask, SPEC 2.2)
cfss       CFSSNet (SPEC 2.5): the U-Net has 3 output channels (logit o + flow); the unrolled CFSS
           iterations give z; loss ``base(z, mask) + W * mean(1 - cos(F_hat, F_gt))``
           (= ``CFSSNet.loss`` for base "bce"; the paper's alpha is W = 0.1)
=========  ==================================================================================

Batches are drawn with a generator keyed on (seed, step), so on the CPU a run resumed from a
checkpoint continues exactly as the uninterrupted run would have. On CUDA training sets cuDNN to
deterministic algorithms, but the backward of the U-Net's bilinear upsampling accumulates with
atomics there, so CUDA runs (and resumed ones) agree only up to float rounding. Checkpoints
(``DIR/checkpoint.pt``), ``config.json`` and ``train_log.json`` are written atomically (temp file
+ ``os.replace``); checkpoints every ``checkpoint_every`` steps and at the end.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

PRIORS = ("none", "qc1", "qc2", "cgpm", "cf", "cfss")
BASE_LOSSES = ("bce", "dice", "bce+dice")
# prior weights used when --prior-weight is not given; chosen a priori from the loss scales
# (each qc term about 10-20 % of the BCE+Dice base loss of an untrained U-Net; cf: SPEC 2.3's
# lambda = 0.4; cfss: the paper's alpha), never tuned on test data
DEFAULT_PRIOR_WEIGHTS = {"none": 0.0, "qc1": 10.0, "qc2": 3.0, "cgpm": 1.0, "cf": 0.6, "cfss": 0.1}
# base loss when --base-loss is not given: the SPEC objectives of cf (2.3) and CFSSnet (2.5) use
# BCE alone; the other priors add soft Dice
DEFAULT_BASE_LOSS = {"cf": "bce", "cfss": "bce"}
TRAIN_FORMAT = "geokernels.segment.train"
# version 2: cf trains (1 - W) * base + W * L (version 1: base + W * L)
FORMAT_VERSION = 2
CHECKPOINT_NAME = "checkpoint.pt"


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint)."""

    dataset: str = "shapes"
    root: str | None = None           # folder datasets: training folder
    val_root: str | None = None       # folder datasets: evaluation folder (default: root)
    prior: str = "none"
    prior_weight: float | None = None  # None: DEFAULT_PRIOR_WEIGHTS[prior]
    base_loss: str | None = None       # None: DEFAULT_BASE_LOSS.get(prior, "bce+dice")
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0
    data_seed: int = 0
    size: int = 64
    train_length: int | None = None
    depth: int = 2
    width: int = 8
    norm: str = "group"
    cfss_iters: int = 10
    cfss_sigma: float = 2.0
    cgpm_steps: int = 100
    checkpoint_every: int = 100
    backend: str = "auto"
    mask_threshold: float | None = None  # folder datasets: binarise soft masks (value > t)

    def __post_init__(self):
        from geokernels.segment.datasets import DATASETS

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.base_loss is None:
            self.base_loss = DEFAULT_BASE_LOSS.get(self.prior, "bce+dice")
        if self.base_loss not in BASE_LOSSES:
            raise ValueError(f"base_loss must be one of {BASE_LOSSES}, got {self.base_loss!r}")
        for name in ("steps", "batch_size", "size", "width", "cfss_iters", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'steps' else 1}, got {v!r}")
        for name in ("depth", "cgpm_steps", "seed", "data_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        v = self.train_length
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"train_length must be an int >= 1 or None, got {v!r}")
        from geokernels._backend import check_backend

        check_backend(self.backend)
        from geokernels.models.unet import NORMS

        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        bottom = self.size
        for _ in range(self.depth):
            bottom = -(-bottom // 2)                     # the U-Net pools with ceil_mode
        if self.norm == "instance" and bottom < 2 or self.norm == "batch" and \
                bottom * bottom * self.batch_size < 2:
            raise ValueError(f"depth: a depth-{self.depth} U-Net pools size {self.size} down to "
                             f"{bottom}x{bottom}, too small for {self.norm} norm at batch size "
                             f"{self.batch_size}; lower --depth or raise --size")
        if self.prior_weight is None:
            self.prior_weight = DEFAULT_PRIOR_WEIGHTS[self.prior]
        w = self.prior_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"prior_weight must be a finite number >= 0, got {w!r}")
        self.prior_weight = float(w)
        if self.prior == "cf" and w > 1:
            raise ValueError(f"prior_weight of prior cf is 1 - lambda of (1 - W) * base + W * L, "
                             f"so it must be in [0, 1], got {w!r}")
        t = self.mask_threshold
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise ValueError(f"mask_threshold must be a finite number or None, got {t!r}")
            if self.dataset != "folder":
                raise ValueError("mask_threshold: only --dataset folder reads mask files")
            self.mask_threshold = float(t)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.dataset == "folder" and not self.root:
            raise ValueError("root: --dataset folder needs --root (a folder with images/ and masks/)")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def changed_from(self, saved: dict, ignore=()) -> dict:
        """{field: (saved value, value now)} of the fields that differ from ``saved`` (an
        ``as_dict()`` stored earlier; a field it lacks counts as its default), except ``ignore``."""
        fields = type(self).__dataclass_fields__
        return {k: (saved.get(k, fields[k].default), v) for k, v in self.as_dict().items()
                if k not in ignore and saved.get(k, fields[k].default) != v}


def build_model(cfg: TrainConfig, in_channels: int = 1) -> torch.nn.Module:
    """The U-Net (1 output channel), or CFSSNet around a 3-channel U-Net for prior "cfss"."""
    from geokernels.models import CFSSNet, UNet

    if cfg.prior == "cfss":
        backbone = UNet(in_channels, 3, depth=cfg.depth, width=cfg.width, norm=cfg.norm)
        return CFSSNet(backbone=backbone, iters=cfg.cfss_iters, sigma=cfg.cfss_sigma,
                       alpha=cfg.prior_weight, backend=cfg.backend)
    return UNet(in_channels, 1, depth=cfg.depth, width=cfg.width, norm=cfg.norm)


def soft_dice_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 sum(p m) + s) / (sum p + sum m + s) per image, averaged; p = sigmoid(logits)."""
    p = torch.sigmoid(logits).flatten(1)
    m = mask.flatten(1)
    return (1 - (2 * (p * m).sum(1) + smooth) / (p.sum(1) + m.sum(1) + smooth)).mean()


def base_loss(kind: str, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = logits.new_zeros(())
    if "bce" in kind:
        loss = loss + F.binary_cross_entropy_with_logits(logits, mask)
    if "dice" in kind:
        loss = loss + soft_dice_loss(logits, mask)
    return loss


def ground_truth_flow(masks: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """SPEC 2.2 contour flow of (N, 1, H, W) masks -> (N, 2, H, W) float32."""
    from geokernels.ops import contour_flow_field

    return torch.cat([contour_flow_field(masks[i:i + chunk])
                      for i in range(0, masks.shape[0], chunk)])


def training_loss(model, cfg: TrainConfig, images, masks, flows=None) -> tuple[torch.Tensor, dict]:
    """(total loss, {"base", "prior"} floats) of one batch for ``cfg.prior`` (module docstring)."""
    from geokernels.ops import contour_flow_loss, qc1_loss, qc2_loss

    W = cfg.prior_weight
    if cfg.prior == "cfss":
        out = model(images)
        base = base_loss(cfg.base_loss, out["logits"], masks)
        prior = (1 - F.cosine_similarity(out["flow"], flows, dim=1)).mean()
    else:
        logits = model(images)
        base = base_loss(cfg.base_loss, logits, masks)
        if cfg.prior == "qc1":
            prior = qc1_loss(torch.sigmoid(logits), backend=cfg.backend)
        elif cfg.prior == "qc2":
            prior = qc2_loss(torch.sigmoid(logits), backend=cfg.backend)
        elif cfg.prior == "cf":
            prior = contour_flow_loss(logits, flows, backend=cfg.backend)
        else:  # none, cgpm (an inference-time module)
            prior = None
    if prior is None:
        return base, {"base": float(base.detach()), "prior": 0.0}
    total = (1 - W) * base + W * prior if cfg.prior == "cf" else base + W * prior
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite training loss (base {float(base)}, prior "
                                 f"{float(prior)}); lower --lr or --prior-weight")
    return total, {"base": float(base.detach()), "prior": float(prior.detach())}


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, step, 7])
    return torch.from_numpy(rng.integers(0, n, size=batch_size))


def load_checkpoint(path) -> dict:
    """Read a segment checkpoint (weights_only); clear errors for missing/corrupt/foreign files."""
    from geokernels.anomaly.checkpoint import CheckpointError
    from geokernels.anomaly.checkpoint import load_checkpoint as _load

    try:
        obj = _load(path, formats=(TRAIN_FORMAT,), max_version=FORMAT_VERSION)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace("flow-matching", "segmentation")) from None
    return obj


def train(cfg: TrainConfig, out_dir: str, *, resume: bool = False, progress: bool = True,
          device: str | None = None, log=print) -> dict:
    """Train per ``cfg``; write ``out_dir/checkpoint.pt``, ``config.json`` and ``train_log.json``.

    ``resume=True`` continues from ``out_dir/checkpoint.pt`` (its config must match ``cfg`` up to
    ``steps`` and ``checkpoint_every``). Without ``resume`` an existing checkpoint is an error
    (never overwritten silently). Returns ``{"checkpoint", "steps", "history", "seconds"}``.
    """
    from geokernels._files import write_json_atomic
    from geokernels.anomaly.checkpoint import save_atomic
    from geokernels._backend import resolve_device
    from geokernels.segment.datasets import make_dataset, materialise

    device = resolve_device(device or "auto")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
    state = None
    if os.path.exists(ckpt_path):
        if not resume:
            raise FileExistsError(f"out: {ckpt_path!r} already exists; pass --resume to continue "
                                  f"that run or choose another --out")
        state = load_checkpoint(ckpt_path)
        # the op backend is free: every backend computes the same numbers (to float rounding)
        diff = cfg.changed_from(state["config"], ignore=("steps", "checkpoint_every", "backend"))
        if cfg.prior == "cf" and int(state.get("version", 1)) < 2:
            raise ValueError("resume: this cf checkpoint was trained with the version-1 objective "
                             "base + W * L (now (1 - W) * base + W * L, SPEC 2.3); start a new run")
        if diff:
            raise ValueError("resume: the checkpoint was trained with different settings: " + ", ".join(
                f"{k}={old!r} (now {new!r})" for k, (old, new) in diff.items()))
    elif resume:
        log(f"resume: no checkpoint in {out_dir!r}; starting from scratch")

    torch.manual_seed(cfg.seed)
    data = make_dataset(cfg.dataset, "train", size=cfg.size, length=cfg.train_length,
                        data_seed=cfg.data_seed, root=cfg.root, threshold=cfg.mask_threshold)
    images, masks = materialise(data, progress=progress, desc=f"{cfg.dataset} train set")
    flows = ground_truth_flow(masks) if cfg.prior in ("cf", "cfss") else None
    model = build_model(cfg, in_channels=images.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), list(state["history"])
        if cfg.steps < start:
            raise ValueError(f"steps: the checkpoint is already at step {start}; pass --steps >= "
                             f"{start} to continue it (got {cfg.steps})")
    write_json_atomic(os.path.join(out_dir, "config.json"), cfg.as_dict())

    def save(step):
        save_atomic({"format": TRAIN_FORMAT, "version": FORMAT_VERSION, "config": cfg.as_dict(),
                     "in_channels": int(images.shape[1]), "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "history": history}, ckpt_path)

    t0 = time.perf_counter()
    model.train()
    cudnn = torch.backends.cudnn
    saved_cudnn = cudnn.deterministic, cudnn.benchmark
    if device.type == "cuda":   # fixed conv algorithms (the bilinear backward stays atomic)
        cudnn.deterministic, cudnn.benchmark = True, False
    try:
        _train_steps(model, cfg, opt, images, masks, flows, device, start, history, save,
                     progress)
    finally:
        cudnn.deterministic, cudnn.benchmark = saved_cudnn
    save(cfg.steps)
    write_json_atomic(os.path.join(out_dir, "train_log.json"), history, indent=None)
    return {"checkpoint": ckpt_path, "steps": cfg.steps, "history": history,
            "seconds": time.perf_counter() - t0}


def _train_steps(model, cfg, opt, images, masks, flows, device, start, history, save, progress):
    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc=f"train {cfg.dataset}/{cfg.prior} seed {cfg.seed}", leave=False)
    for step in bar:
        idx = _batch_indices(images.shape[0], cfg.batch_size, cfg.seed, step)
        x, y = images[idx].to(device), masks[idx].to(device)
        f = flows[idx].to(device) if flows is not None else None
        loss, parts = training_loss(model, cfg, x, y, f)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), **parts})
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", prior=f"{parts['prior']:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    bar.close()
