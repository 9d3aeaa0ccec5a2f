"""Conditional flow-matching training of the velocity U-Net on normal images (SPEC.md 3).

    x_t = (1 - t)*eps + t*x,   eps ~ N(0, I),   t ~ U[0, 1]
    loss = mean (v_theta(x_t, t[, c]) - (x - eps))^2

Only normal images (label 0) are used. AdamW, linear warm-up then cosine decay, EMA of the weights
(what the detector scores with), gradient-norm clipping, bf16 autocast on GPU, a tqdm bar with loss
and throughput, atomic periodic checkpoints with resume.

Determinism: every random draw of step s (which images, their t, eps, flips; dropout) comes from
generators seeded by (seed, step) -- not from a running RNG stream -- so a run resumed from a
checkpoint at step s reproduces the uninterrupted run exactly, and the batch of step s does not
depend on the number of processes.

Multi-GPU: the same function (and ``geokernels anomaly train``) under
``torchrun --nproc_per_node N`` initialises torch.distributed (NCCL on GPU, Gloo on CPU) when WORLD_SIZE > 1 and wraps the model in
DistributedDataParallel; ``batch_size`` is the global batch, split evenly over the ranks; rank 0
writes checkpoints and shows progress.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from geokernels.anomaly.checkpoint import TRAIN_FORMAT, FORMAT_VERSION, load_checkpoint, save_atomic
from geokernels.models.velocity_unet import PRESETS, VelocityUNet

INPUT_RANGES = ("[-1,1]", "[0,1]")
AUGMENTATIONS = ("none", "flip", "flip+rot90")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train`` (stored in every checkpoint).

    steps: optimiser steps in total. batch_size: global batch (split over DDP ranks).
    lr / weight_decay / betas: AdamW. warmup_steps: linear warm-up (step s, from 0, at
    (s + 1) / warmup_steps of lr); then cosine decay to
    ``min_lr_ratio * lr`` at ``steps``. ema_decay: EMA of the weights (decay warms up as
    min(ema_decay, (1+s)/(10+s))). grad_clip: max global gradient norm (0 = off).
    seed: all randomness. checkpoint_every: steps between checkpoints (0 = only at the end).
    augment: "none", "flip" (random h/v flips) or "flip+rot90" (plus right-angle rotations; for
    textures). precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32".
    input_range: images in [0, 1] are mapped to "[-1,1]" (default) or kept "[0,1]" before the
    flow (the detector applies the same map when scoring).
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    augment: str = "none"
    precision: str = "auto"
    input_range: str = "[-1,1]"
    log_every: int = 10

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or \
                self.log_every < 1:
            raise ValueError(f"log_every must be a positive int, got {self.log_every!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {INPUT_RANGES}, got {self.input_range!r}")


@dataclass
class TrainResult:
    """What ``train`` returns: the EMA model (eval mode) and the run's record."""

    model: VelocityUNet
    step: int
    losses: list = field(default_factory=list)  # per-step training loss (this process, this run)
    checkpoint: str | None = None
    config: TrainConfig | None = None
    class_names: list | None = None
    images_per_second: float = float("nan")
    seconds_per_step: float = float("nan")


def to_model_space(images: torch.Tensor, input_range: str) -> torch.Tensor:
    """Map images in [0, 1] to the space the flow is trained in (see TrainConfig.input_range)."""
    return images * 2.0 - 1.0 if input_range == "[-1,1]" else images


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): independent streams per (seed, step, ...)."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 29
    return z & 0x7FFFFFFFFFFFFFFF


_STREAM_DATA, _STREAM_STEP, _STREAM_DROPOUT, _STREAM_INIT = 1, 2, 3, 4


class _EpochSchedule:
    """Sample indices of step s: epoch-wise random permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, _STREAM_DATA, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
            while len(self._perms) > 3:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        pos = torch.arange(step * batch_size, (step + 1) * batch_size)
        epochs = pos // self.n
        out = torch.empty(batch_size, dtype=torch.long)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[pos[sel] % self.n]
        return out


# ------------------------------------------------------------------------------ data
def _sample_image(sample):
    if isinstance(sample, dict):
        if "image" not in sample:
            raise ValueError("dataset samples must be dicts with an 'image' entry (or tensors)")
        return sample["image"], int(sample.get("label", 0))
    if isinstance(sample, (tuple, list)):
        return sample[0], int(sample[1]) if len(sample) > 1 else 0
    return sample, 0


def load_normal_images(dataset, name: str = "dataset", progress: bool = False) -> torch.Tensor:
    """All normal (label 0) images of ``dataset`` stacked into one (N, C, H, W) float32 tensor.

    ``dataset``: a (N, C, H, W) tensor, or a sequence of samples (dicts with "image" and
    optionally "label", (image, label) pairs, or image tensors).
    """
    if isinstance(dataset, torch.Tensor):
        images = dataset
        if images.dim() == 3:   # one (C, H, W) image or a grayscale (N, H, W) stack: ambiguous
            raise ValueError(f"{name} must be a (N, C, H, W) tensor, got a 3-D tensor of shape "
                             f"{tuple(images.shape)}: pass x[None] for one (C, H, W) image or "
                             f"x[:, None] for a stack of N grayscale (H, W) images")
    else:
        try:
            n = len(dataset)
        except TypeError:
            raise TypeError(f"{name} must be a tensor or a sized dataset, got "
                            f"{type(dataset).__name__}") from None
        if n == 0:
            raise ValueError(f"{name} is empty: no images to train on")
        it = range(n)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="loading normal images", leave=False)
        kept = []
        for i in it:
            img, label = _sample_image(dataset[i])
            if label == 0:
                img = torch.as_tensor(img)
                if not img.is_floating_point():   # uint8 samples trained as 0..255 before
                    raise ValueError(f"{name} images must be float in [0, 1], got dtype "
                                     f"{img.dtype} (item {i}); divide 8-bit images by 255")
                kept.append(img.to(torch.float32))
        if not kept:
            raise ValueError(f"{name} has no normal (label 0) images; flow matching trains on "
                             f"normal images only")
        shapes = {tuple(k.shape) for k in kept}
        if len(shapes) != 1:
            raise ValueError(f"{name} images must all have the same shape, got {sorted(shapes)}")
        images = torch.stack(kept)
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError(f"{name} images must be float (N, C, H, W), got "
                         f"{getattr(images, 'dtype', None)} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty: no images to train on")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contains NaN or Inf pixel values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:   # [-1, 1] data would be mapped again, to [-3, 1]
        raise ValueError(f"{name} images must be in [0, 1] (the training maps them to the flow's "
                         f"range itself), got values in [{lo:.4g}, {hi:.4g}]")
    return images.float().contiguous()


def _augment(x: torch.Tensor, mode: str, coins: torch.Tensor) -> torch.Tensor:
    """Per-sample random flips (and transposes: with the flips, all 8 right-angle symmetries).

    ``coins`` (N, 3) uniform draws decide horizontal flip, vertical flip, transpose.
    """
    if mode == "none":
        return x
    flips = coins < 0.5
    x = torch.where(flips[:, 0, None, None, None], x.flip(-1), x)
    x = torch.where(flips[:, 1, None, None, None], x.flip(-2), x)
    if mode == "flip+rot90":
        x = torch.where(flips[:, 2, None, None, None], x.transpose(-1, -2), x)
    return x


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio at config.steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


# ------------------------------------------------------------------------------ distributed
class _Dist:
    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = 0, 0
        if self.world > 1:
            import torch.distributed as dist

            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if device is None and torch.cuda.is_available():
                device = f"cuda:{self.local_rank}"
            dev = torch.device(device or "cpu")
            if dev.type == "cuda" and dev.index is None:  # "cuda": this rank's GPU, not GPU 0
                dev = torch.device("cuda", self.local_rank)
            device = dev
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            if not dist.is_initialized():
                # kept for the life of the process (destroyed at exit): a second train() in the
                # same torchrun process (detector.fit per category) re-creating the group through
                # the env:// store hung or failed with gloo connection errors
                import atexit

                dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
                atexit.register(_destroy_process_group)
            self.rank = dist.get_rank()
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value


def _destroy_process_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _config_dict(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["betas"] = list(d["betas"])
    return d


def _build_config(config, overrides) -> TrainConfig:
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig(**config)
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or dict, got {type(config).__name__}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown training option(s): {sorted(unknown)}")
    config = dataclasses.replace(config, **overrides)
    config.betas = tuple(config.betas)
    config.validate()
    return config


# ------------------------------------------------------------------------------ train
def train(dataset, *, model: VelocityUNet | None = None, preset: str = "tiny",
          model_kwargs: dict | None = None, config: TrainConfig | dict | None = None,
          checkpoint: str | os.PathLike | None = None, resume: bool = False,
          class_conditional: bool | None = None, device=None, progress: bool = True,
          compile: bool = False, time_budget_s: float | None = None,
          **overrides) -> TrainResult:
    """Train a velocity U-Net by conditional flow matching on the normal images of ``dataset``.

    Args:
        dataset: the normal training images: a (N, C, H, W) tensor in [0, 1], a dataset of samples
            (dicts with "image" (C, S, S) and "label"; label != 0 samples are skipped), or a dict
            {category name: dataset}. A dict trains one class-conditional model over the
            categories (class index = position in the dict) unless class_conditional=False,
            which pools them into one unconditional model.
        model: a VelocityUNet to train (default: ``VelocityUNet.from_preset(preset,
            **model_kwargs)`` with ``num_classes`` set for class-conditional training).
        config / overrides: a TrainConfig (or dict) and/or its fields as keywords
            (steps=, batch_size=, lr=, ...).
        checkpoint: path of the training checkpoint, written atomically every
            ``checkpoint_every`` steps and at the end (rank 0 only).
        resume: continue from ``checkpoint`` if it exists (model config and category order
            must match). The result equals an uninterrupted run with the same config; changed
            options are warned about and take effect from the resumed step (lr, betas and
            weight decay included).
        device: default cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu.
        progress: tqdm bar with loss and images/s (rank 0).
        compile: torch.compile the model for training (GPU speed-up; off by default).
        time_budget_s: wall-clock budget. After a short probe (steps 5-25 of this run) the total
            number of steps is lowered, if needed, so the run ends within the budget; the cosine
            schedule follows the new total, which is recorded in the checkpoint (rerun with
            steps=that number to reproduce the run exactly, when warmup_steps >= 25: a shorter
            warm-up lets the probe's steps use the cosine of the original total, which the
            rerun does not). Resuming such a run continues
            toward that total (no second probe or budget); a finished one trains no more.

    Returns:
        TrainResult with the EMA model in eval mode (on ``device``), the final step and the
        per-step losses of this run.
    """
    config = _build_config(config, overrides)
    class_names = None
    if isinstance(dataset, dict):
        if not dataset:
            raise ValueError("dataset is an empty dict: no categories to train on")
        class_names = [str(k) for k in dataset]
        parts = [load_normal_images(ds, name=f"dataset[{k!r}]", progress=progress)
                 for k, ds in dataset.items()]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"all categories must have the same image shape, got {sorted(shapes)}")
        images = torch.cat(parts)
        if class_conditional is None or class_conditional:
            labels = torch.cat([torch.full((len(p),), i, dtype=torch.long)
                                for i, p in enumerate(parts)])
        else:
            labels, class_names = None, None
    else:
        if class_conditional:
            raise ValueError("class_conditional=True needs dataset as a dict {category: dataset}")
        images, labels = load_normal_images(dataset, progress=progress), None
    num_classes = 0 if labels is None else len(class_names)
    if images.shape[-1] != images.shape[-2]:
        # the model records one image_size and the detector scores size x size images: a
        # non-square run trained a model that could not score its own training images
        raise ValueError(f"dataset images must be square (H == W), got "
                         f"{tuple(images.shape[-2:])}; resize or crop them (e.g. image_size=...)")

    if model is None:
        kwargs = dict(model_kwargs or {})
        kwargs.setdefault("in_channels", images.shape[1])
        kwargs.setdefault("image_size", images.shape[-1])
        kwargs["num_classes"] = num_classes
        with torch.random.fork_rng(devices=[]):  # the initial weights come from config.seed too
            torch.manual_seed(_mix_seed(config.seed, _STREAM_INIT))
            model = VelocityUNet.from_preset(preset, **kwargs)
    elif not isinstance(model, VelocityUNet):
        raise TypeError(f"model must be a VelocityUNet, got {type(model).__name__}")
    if model.in_channels != images.shape[1]:
        raise ValueError(f"dataset images have {images.shape[1]} channels but the model expects "
                         f"{model.in_channels}")
    if model.num_classes != num_classes:
        raise ValueError(f"model has num_classes={model.num_classes} but the dataset gives "
                         f"{num_classes} classes")
    if model.config.get("image_size") not in (None, images.shape[-1]):
        raise ValueError(f"the model records image_size={model.config['image_size']} (model_kwargs"
                         f" / model) but the dataset images are {images.shape[-1]}x"
                         f"{images.shape[-1]}: the detector would refuse its own training images")
    m = model.size_multiple
    if images.shape[-1] % m or images.shape[-2] % m:
        raise ValueError(f"dataset images of size {tuple(images.shape[-2:])} are not multiples of "
                         f"{m}, as this U-Net needs")

    dist_ctx = _Dist(device)
    if config.batch_size % dist_ctx.world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of "
                         f"processes ({dist_ctx.world})")
    cudnn_benchmark = torch.backends.cudnn.benchmark   # _train_loop turns it on for CUDA runs
    try:
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0, got {time_budget_s!r}")
        return _train_loop(images, labels, class_names, model, config, checkpoint, resume,
                           dist_ctx, progress, compile, time_budget_s)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark   # a global: leave it as it was


def _train_loop(images, labels, class_names, model, config, checkpoint, resume, dist_ctx,
                progress, compile_model, time_budget_s=None):
    device = dist_ctx.device
    t_launch = time.perf_counter()
    model = model.to(device, memory_format=torch.channels_last)  # NHWC convs: faster CPU & GPU
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    start_step = 0
    budget_fitted = False   # the total was lowered to fit time_budget_s (kept in the checkpoint)
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        ckpt = load_checkpoint(checkpoint, formats=(TRAIN_FORMAT,))
        if ckpt["model_config"] != _unwrap(model).config:
            raise ValueError(f"cannot resume from {os.fspath(checkpoint)!r}: its model config "
                             f"{ckpt['model_config']} differs from {_unwrap(model).config}")
        if ckpt.get("class_names") != class_names:   # the class indices would be swapped
            raise ValueError(f"cannot resume from {os.fspath(checkpoint)!r}: it was trained on the "
                             f"categories {ckpt.get('class_names')} (class index = position), "
                             f"now {class_names}; give them in the same order")
        old = ckpt.get("train_config", {})
        if time_budget_s is not None and ckpt.get("budget_fitted"):
            # the first run fitted its total to the budget: continue toward that total (the same
            # cosine schedule) instead of probing again and granting a second budget
            config.steps = int(old["steps"])
            time_budget_s, budget_fitted = None, True
        changed = {k: (old.get(k), v) for k, v in _config_dict(config).items()
                   if k in old and old[k] != v and k not in ("log_every", "checkpoint_every")}
        if changed:
            warnings.warn(f"resuming {os.fspath(checkpoint)!r} with changed training options "
                          f"(old, new): {changed}; the run will differ from an uninterrupted one",
                          stacklevel=3)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_step = int(ckpt["step"])
        # the optimizer state holds the old lr / betas / weight decay: the new ones apply from here
        # (an unchanged config leaves every value as it was: resume stays exact)
        scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group.update(lr=config.lr * lr_factor(start_step, config), betas=tuple(config.betas),
                         weight_decay=config.weight_decay)

    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net = model
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        net = torch.compile(net)

    n_local = config.batch_size // dist_ctx.world
    lo, hi = dist_ctx.rank * n_local, (dist_ctx.rank + 1) * n_local
    schedule = _EpochSchedule(len(images), config.seed)
    data = images.to(device) if device.type == "cuda" and images.numel() * 4 < 4 * 2**30 else images
    label_data = None if labels is None else labels.to(data.device)
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]

    losses: list[float] = []
    pending: list[torch.Tensor] = []
    bar = None
    if progress and dist_ctx.main and start_step < config.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc="flow-matching training",
                   unit="step", dynamic_ncols=True)

    def save(step):
        if checkpoint is None:
            return
        # the loss is checked before the update it drives: the weights can turn non-finite in
        # between. Every rank holds the same weights, so every rank stops alike.
        with torch.no_grad():
            finite = all(bool(torch.isfinite(p).all()) for p in params + ema_params)
        if not finite:
            raise FloatingPointError(f"the weights became non-finite by step {step} (try a lower "
                                     f"lr or precision='fp32'); the checkpoint on disk is kept")
        if dist_ctx.main:
            save_atomic({
                "format": TRAIN_FORMAT, "version": FORMAT_VERSION,
                "model_config": _unwrap(model).config,
                "model": _unwrap(model).state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "train_config": _config_dict(config), "class_names": class_names,
                "input_range": config.input_range, "rng": _rng_state(),
                "world_size": dist_ctx.world, "budget_fitted": budget_fitted,
            }, checkpoint)
        dist_ctx.barrier()

    # torch.manual_seed below reseeds every GPU: restore all of them afterwards
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    t_start, steps_done, step = time.perf_counter(), 0, start_step
    probe_start, probe_end = start_step + 5, start_step + 25
    t_probe = None
    with torch.random.fork_rng(devices=devices):
        step = start_step - 1
        while step + 1 < config.steps:
            step += 1
            if time_budget_s is not None and step in (probe_start, probe_end):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                if step == probe_start:
                    t_probe = now
                else:  # fit the remaining steps into the budget (same total on every rank)
                    per_step = (now - t_probe) / (probe_end - probe_start)
                    fit = step + (time_budget_s - (now - t_launch)) / per_step
                    fit = int(dist_ctx.mean(torch.tensor(float(fit), device=device)))
                    if fit < config.steps:
                        config.steps = max(step + 1, fit)
                        budget_fitted = True
                        if bar is not None:
                            bar.total = config.steps
                            bar.refresh()
            # every random draw of this step comes from (seed, step): resume-exact, rank-invariant
            g = torch.Generator(device).manual_seed(_mix_seed(config.seed, _STREAM_STEP, step))
            torch.manual_seed(_mix_seed(config.seed, _STREAM_DROPOUT, step, dist_ctx.rank))
            idx = schedule.batch(step, config.batch_size)
            t_all = torch.rand(config.batch_size, generator=g, device=device)
            eps_all = torch.randn((config.batch_size,) + tuple(images.shape[1:]), generator=g,
                                  device=device)
            coins_all = torch.rand(config.batch_size, 3, generator=g, device=device)
            # draws are made for the whole global batch; this rank takes its slice [lo, hi)
            t, eps = t_all[lo:hi], eps_all[lo:hi]
            x = data[idx[lo:hi].to(data.device)].to(device, non_blocking=True)
            x = _augment(to_model_space(x, config.input_range), config.augment, coins_all[lo:hi])
            cond = None if label_data is None else \
                label_data[idx[lo:hi].to(label_data.device)].to(device)
            x_t = (1 - t)[:, None, None, None] * eps + t[:, None, None, None] * x
            target = x - eps
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                v = net(x_t, t, cond)
            loss = torch.mean((v.float() - target) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema_params, params, 1.0 - decay)
            pending.append(loss.detach())
            steps_done += 1
            last = step + 1 == config.steps
            saving = bool(config.checkpoint_every) and (step + 1) % config.checkpoint_every == 0
            # flush (and check) before a checkpoint too: a diverged run must not overwrite the
            # last good checkpoint with NaN weights
            if len(pending) >= config.log_every or last or saving:
                vals = torch.stack(pending)
                mean_loss = float(dist_ctx.mean(vals.mean()))
                vals = vals.tolist()
                pending.clear()
                # the all-reduced mean: non-finite on any rank -> every rank stops, with this error
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss became non-finite by step {step + 1} "
                                             f"(try a lower lr or precision='fp32')")
                losses.extend(vals)
                if bar is not None:
                    elapsed = time.perf_counter() - t_start
                    bar.update(step + 1 - bar.n)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                    img_s=f"{steps_done * config.batch_size / elapsed:.1f}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and not last:
                save(step + 1)
        final_step = max(start_step, config.steps)
        if start_step < config.steps or (checkpoint is not None and not os.path.exists(checkpoint)):
            save(final_step)
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t_start
    ema.eval()
    return TrainResult(
        model=ema, step=final_step, losses=losses,
        checkpoint=None if checkpoint is None else os.fspath(checkpoint), config=config,
        class_names=class_names,
        images_per_second=steps_done * config.batch_size / elapsed if steps_done else float("nan"),
        seconds_per_step=elapsed / steps_done if steps_done else float("nan"))


def load_trained_model(path, device="cpu", weights: str = "ema") -> tuple[VelocityUNet, dict]:
    """The model of a training checkpoint (EMA weights by default) and the checkpoint dict."""
    ckpt = load_checkpoint(path, formats=(TRAIN_FORMAT,))
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    model = VelocityUNet.from_config(ckpt["model_config"])
    try:
        model.load_state_dict(ckpt[weights])
    except (RuntimeError, KeyError) as exc:
        from geokernels.anomaly.checkpoint import CheckpointError

        raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds weights that do not fit its "
                              f"model config: {exc}") from exc
    return model.to(device, memory_format=torch.channels_last).eval(), ckpt


__all__ = ["TrainConfig", "TrainResult", "train", "load_trained_model", "lr_factor",
           "to_model_space", "load_normal_images", "PRESETS"]
