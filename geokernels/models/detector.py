"""``FlowMismatchDetector``: flow-matching anomaly detection end to end (SPEC.md 3).

    det = FlowMismatchDetector().fit(train_set)                 # or .pretrained() / .load(path)
    heatmaps, scores = det.score(images)                        # (N, H, W), (N,)

Scoring uses the fused multi-path mismatch op ``geokernels.flow_mismatch`` (K noise paths batched
through the velocity model at T interior times, reduced over paths without materialising the
(K, T, C, H, W) stack) and ``geokernels.anomaly_score``. Two comparison scores use the same model:
``method="reconstruction"`` (noise to t0, integrate the learned ODE to t = 1, per-pixel error) and
the optional, non-default ``method="calibrated_mismatch"`` (mismatch standardised by per-pixel
statistics on held-out normal images; call ``calibrate`` first).

One detector holds either one velocity model (unconditional, or class-conditional over
``class_names``) or one model per category (``fit`` on a dict with class_conditional=False).
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch
from torch import nn

from geokernels.anomaly.baselines import MismatchCalibration, reconstruction_heatmap
from geokernels.anomaly.checkpoint import (DETECTOR_FORMAT, FORMAT_VERSION, TRAIN_FORMAT,
                                           CheckpointError, load_checkpoint, save_atomic)
from geokernels.models.velocity_unet import VelocityUNet

SCORE_METHODS = ("mismatch", "reconstruction", "calibrated_mismatch")
SCORE_MODES = ("max+topk", "max", "topk_mean")
COMPILE_MODES = (None, "none", "default", "reduce-overhead", "max-autotune")
PRECISIONS = ("fp32", "bf16")
PRETRAINED = {"textures": "flow_mismatch_textures.pt"}

_DEFAULT_SETTINGS = dict(K=8, T=24, agg="min", r=2.0, seed=0, score_mode="max+topk", topk=0.01,
                         smooth_sigma=0.0, input_range="[-1,1]", batch_size=8,
                         reconstruction_t0=0.5, reconstruction_steps=8,
                         reconstruction_solver="heun", reconstruction_paths=1,
                         paths_per_call="auto")
# paths_per_call="auto": on CPU two images' K paths per model call (batches of 2K rows ran faster
# per sample than B*K = 64 rows for the shipped U-Net on a 2-core CPU, see benchmarks/RESULTS.md);
# elsewhere all of the batch's paths in one call (a GPU wants the largest batch).
CPU_IMAGES_PER_CALL = 2


class _BoundVelocity(nn.Module):
    """v(x_t, t, cond) -> float32 velocity, with the class index bound and optional bf16 autocast.

    The mismatch op calls ``model(x_t, t, cond)`` with N = (images x paths) rows; binding the class
    here (all images of one call share a category) keeps the op free of class bookkeeping.
    """

    def __init__(self, model: VelocityUNet, class_index: int | None, bf16: bool):
        super().__init__()
        self.model = model
        self.class_index = class_index
        self.bf16 = bf16

    def forward(self, x_t, t, cond=None):
        if self.class_index is not None:
            cond = torch.full((x_t.shape[0],), self.class_index, dtype=torch.long,
                              device=x_t.device)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16,
                            enabled=self.bf16 and x_t.device.type == "cuda"):
            v = self.model(x_t, t, cond)
        return v.to(x_t.dtype)


def _check_setting(name, value):
    if name in ("K", "T", "batch_size", "reconstruction_steps", "reconstruction_paths"):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        return int(value)
    if name == "paths_per_call":
        if value == "auto" or value is None:
            return "auto" if value == "auto" else None
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"paths_per_call must be 'auto', None (all paths of a batch) or a "
                             f"positive int, got {value!r}")
        return int(value)
    if name == "seed":
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"seed must be an int >= 0, got {value!r}")
        return int(value)
    if name in ("r", "smooth_sigma", "topk", "reconstruction_t0"):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}")
        value = float(value)
        if name == "smooth_sigma" and value < 0:
            raise ValueError(f"smooth_sigma must be >= 0, got {value!r}")
        if name == "topk" and not 0 < value <= 1:
            raise ValueError(f"topk must be in (0, 1], got {value!r}")
        if name == "reconstruction_t0" and not 0 < value < 1:
            raise ValueError(f"reconstruction_t0 must be in (0, 1), got {value!r}")
        return value
    if name == "score_mode" and value not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {value!r}")
    if name == "input_range" and value not in ("[-1,1]", "[0,1]"):
        raise ValueError(f"input_range must be '[-1,1]' or '[0,1]', got {value!r}")
    if name == "reconstruction_solver" and value not in ("euler", "heun"):
        raise ValueError(f"reconstruction_solver must be 'euler' or 'heun', got {value!r}")
    if name == "agg":
        if not isinstance(value, str):
            raise ValueError(f"agg must be 'min', 'mean', 'median' or 'quantile:alpha', got "
                             f"{value!r}")
        from geokernels.ops.flow_mismatch import parse_agg

        parse_agg(value, 8)   # an unknown name or a bad quantile fails here, not at score
    return value


class FlowMismatchDetector:
    """Anomaly detector scoring images by the flow-matching mismatch (SPEC.md 3).

    Args:
        model: a trained ``VelocityUNet`` (unconditional or class-conditional), or a dict
            {category: VelocityUNet} of per-category models; None until ``fit``/``load``. The
            detector keeps its own copy (in eval mode, frozen, channels_last): the caller's
            module is left as it was and can go on training.
        class_names: the categories of a class-conditional model (class index = position).
        K, T, agg, r, seed, smooth_sigma: mismatch settings (SPEC 3 defaults K=8, T=24, "min", 2);
            smooth_sigma > 0 smooths the reconstruction baseline's heatmaps alike.
        score_mode, topk: image score from the heatmap ("max+topk", top 1 %).
        input_range: how [0, 1] images enter the flow ("[-1,1]" default, as trained).
        batch_size: images per mismatch call (K paths each). Noise is drawn per (seed, index of
            the image in the ``score`` call, path), so batch_size changes no noise; the heatmaps
            agree to float rounding of the model (a U-Net's convolutions round differently at
            another batch size; bit-identical for a batch-invariant model).
        paths_per_call: rows of one model call (the op's ``chunk``): "auto" (default: 2K on
            CPU, all batch_size*K paths elsewhere), None (all) or an int; speed only, as
            batch_size.
        device: where the model runs (default: cuda if available, else cpu).
        precision: "fp32" (default) or "bf16" (autocast of the model calls; CUDA only).
        compile: None (default) or a torch.compile mode for the model calls; "reduce-overhead"
            captures CUDA graphs (the T model calls per batch have identical shapes).
        backend: backend of the mismatch op ("auto", "cuda", "triton", "cpu", "torch").
        reconstruction_t0 / _steps / _solver / _paths: the reconstruction baseline's settings.
    """

    def __init__(self, model=None, *, class_names=None, device=None, precision: str = "fp32",
                 compile: str | None = None, backend: str = "auto", **settings):
        unknown = set(settings) - set(_DEFAULT_SETTINGS)
        if unknown:
            raise TypeError(f"unknown detector setting(s): {sorted(unknown)}; known: "
                            f"{sorted(_DEFAULT_SETTINGS)}")
        self.settings = dict(_DEFAULT_SETTINGS)
        for k, v in settings.items():
            self.settings[k] = _check_setting(k, v)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        from geokernels._backend import check_backend, resolve_device

        check_backend(backend)
        self.precision = precision
        self.compile = None if compile == "none" else compile
        self.backend = backend
        self.device = resolve_device("auto" if device is None else device)
        self.members: dict[str | None, VelocityUNet] = {}
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.calibrations: dict[str | None, MismatchCalibration] = {}
        self.metadata: dict = {}  # JSON-able provenance (dataset, training command, ...), saved
        self._compiled: dict = {}
        if model is not None:
            self._set_models(model, self.class_names)

    # ------------------------------------------------------------------ models
    def _set_models(self, model, class_names):
        if isinstance(model, dict):
            if not model:
                raise ValueError("model dict is empty")
            for name, m in model.items():
                if not isinstance(m, VelocityUNet):
                    raise TypeError(f"model[{name!r}] must be a VelocityUNet, got "
                                    f"{type(m).__name__}")
                if m.num_classes:
                    raise ValueError("per-category models must be unconditional (num_classes=0)")
            members = {str(k): m for k, m in model.items()}
            if class_names is not None:
                raise ValueError("class_names is for one class-conditional model; a dict of "
                                 "per-category models is named by its keys")
        elif isinstance(model, VelocityUNet):
            members = {None: model}
            if model.num_classes:
                if class_names is None:
                    class_names = [str(i) for i in range(model.num_classes)]
                if len(class_names) != model.num_classes:
                    raise ValueError(f"class_names has {len(class_names)} entries but the model "
                                     f"has num_classes={model.num_classes}")
                if len({str(c) for c in class_names}) != len(class_names):
                    raise ValueError(f"class_names must be distinct, got {list(class_names)}")
            elif class_names is not None:
                raise ValueError("class_names given for an unconditional model (num_classes=0); "
                                 "a class-conditional VelocityUNet needs num_classes > 0")
        else:
            raise TypeError(f"model must be a VelocityUNet or a dict of them, got "
                            f"{type(model).__name__}")
        import copy

        # a copy: eval mode, frozen weights and channels_last must not reach the caller's module
        self.members = {k: copy.deepcopy(m).to(self.device, memory_format=torch.channels_last)
                        .eval().requires_grad_(False) for k, m in members.items()}
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self._compiled = {}

    @property
    def categories(self) -> list[str] | None:
        """The categories this detector knows (None for one category-agnostic model)."""
        if None in self.members:
            return self.class_names
        return list(self.members)

    @property
    def is_fitted(self) -> bool:
        return bool(self.members)

    def _require_fitted(self):
        if not self.members:
            raise RuntimeError("this FlowMismatchDetector has no model yet: call fit(), load() "
                               "or FlowMismatchDetector.pretrained() first")

    def _member(self, category):
        """(model, class index or None, calibration key) for ``category``."""
        self._require_fitted()
        if None in self.members:
            model = self.members[None]
            if not model.num_classes:
                return model, None, None
            if category is None:
                raise ValueError(f"category is required: the model is class-conditional over "
                                 f"{self.class_names}")
            if isinstance(category, Integral) and not isinstance(category, bool):
                if not 0 <= int(category) < model.num_classes:
                    raise ValueError(f"category index {category} outside [0, {model.num_classes})")
                return model, int(category), self.class_names[int(category)]
            if category not in self.class_names:
                raise ValueError(f"unknown category {category!r}; this detector knows "
                                 f"{self.class_names}")
            return model, self.class_names.index(category), category
        if category is None:
            if len(self.members) == 1:
                key = next(iter(self.members))
                return self.members[key], None, key
            raise ValueError(f"category is required: this detector has one model per category "
                             f"{list(self.members)}")
        if category not in self.members:
            raise ValueError(f"unknown category {category!r}; this detector knows "
                             f"{list(self.members)}")
        return self.members[category], None, category

    def _velocity(self, model, class_index):
        # compile=...: one compiled graph per model, shared by all its categories (the class
        # enters as a tensor, not as a constant Dynamo would specialise and recompile on)
        if self.compile is not None:
            if id(model) not in self._compiled:
                self._compiled[id(model)] = torch.compile(model, mode=self.compile, dynamic=False)
            model = self._compiled[id(model)]
        return _BoundVelocity(model, class_index, self.precision == "bf16")

    def to(self, device) -> "FlowMismatchDetector":
        self.device = torch.device(device)
        self.members = {k: m.to(self.device, memory_format=torch.channels_last)
                        for k, m in self.members.items()}
        self._compiled = {}
        return self

    # ------------------------------------------------------------------ fit
    def fit(self, dataset, *, class_conditional: bool | None = None, preset: str = "tiny",
            model_kwargs: dict | None = None, checkpoint=None, resume: bool = False,
            progress: bool = True, **train_options) -> "FlowMismatchDetector":
        """Train the velocity model(s) on the normal images of ``dataset`` (SPEC 3).

        ``dataset``: a (N, C, H, W) tensor in [0, 1], a dataset of sample dicts, or a dict
        {category: dataset}: one class-conditional model (default) or, with
        class_conditional=False, one model per category (checkpoint paths get a _<category>
        suffix). ``train_options`` go to ``geokernels.anomaly.train`` (steps=, batch_size=, lr=,
        augment=, seed=, ...). Returns self.
        """
        from geokernels.anomaly.train import train

        common = dict(preset=preset, model_kwargs=model_kwargs, resume=resume, progress=progress,
                      device=self.device, **train_options)
        if isinstance(dataset, dict) and class_conditional is False:
            if not dataset:
                raise ValueError("dataset is an empty dict: no categories to train on")
            models = {}
            for name, ds in dataset.items():
                ckpt = None
                if checkpoint is not None:
                    stem, ext = os.path.splitext(os.fspath(checkpoint))
                    ckpt = f"{stem}_{name}{ext or '.pt'}"
                result = train(ds, checkpoint=ckpt, **common)
                models[str(name)] = result.model
            self.settings["input_range"] = result.config.input_range
            self._set_models(models, None)
        else:
            result = train(dataset, checkpoint=checkpoint, class_conditional=class_conditional,
                           **common)
            self.settings["input_range"] = result.config.input_range
            self._set_models(result.model, result.class_names)
        self.calibrations = {}
        self.last_train_result = result
        return self

    # ------------------------------------------------------------------ inputs
    def _as_images(self, images, model) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            x = images
        elif isinstance(images, (list, tuple)) and images and isinstance(images[0], torch.Tensor):
            x = torch.stack([torch.as_tensor(i) for i in images])
        else:
            try:
                n = len(images)
            except TypeError:
                raise TypeError(f"images must be a tensor, a list of tensors or a dataset, got "
                                f"{type(images).__name__}") from None
            if n == 0:
                raise ValueError("images is empty")
            x = torch.stack([images[i]["image"] if isinstance(images[i], dict) else images[i]
                             for i in range(n)])
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got dtype {x.dtype}")
        if x.dim() == 3:
            x = x[None]
        c = model.in_channels
        size = model.config.get("image_size")
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"images must have shape (N, {c}, H, W) or ({c}, H, W), got "
                             f"{tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("images is empty")
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"images must be {size}x{size} (the size the model was trained at), "
                             f"got {x.shape[-2]}x{x.shape[-1]}; resize them first")
        m = model.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"images height and width must be multiples of {m}, got "
                             f"{tuple(x.shape[-2:])}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or Inf values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                             f"divide 8-bit images by 255")
        return x.float()

    def _paths_per_call(self):
        ppc = self.settings["paths_per_call"]
        if ppc == "auto":
            return CPU_IMAGES_PER_CALL * self.settings["K"] if self.device.type == "cpu" else None
        return ppc

    def _model_space(self, x):
        return x * 2.0 - 1.0 if self.settings["input_range"] == "[-1,1]" else x

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def heatmaps(self, images, *, category=None, method: str = "mismatch",
                 batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Per-pixel anomaly maps (N, H, W) float32 on CPU; see ``score``."""
        return self.score(images, category=category, method=method, batch_size=batch_size,
                          progress=progress)[0]

    @torch.no_grad()
    def score(self, images, *, category=None, method: str = "mismatch",
              batch_size: int | None = None, progress: bool = False):
        """Score images: returns (heatmaps (N, H, W), scores (N,)), float32 CPU tensors.

        Args:
            images: (N, C, H, W) or (C, H, W) float tensor in [0, 1] at the training size, a list
                of (C, H, W) tensors, or a dataset of sample dicts (their "image").
            category: which category (required for class-conditional / per-category detectors).
            method: "mismatch" (default, SPEC 3), "reconstruction" (baseline) or
                "calibrated_mismatch" (non-default; needs ``calibrate``).
            batch_size: images per call (default: the detector's ``batch_size`` setting).
        """
        if method not in SCORE_METHODS:
            raise ValueError(f"method must be one of {SCORE_METHODS}, got {method!r}")
        model, class_index, key = self._member(category)
        if method == "calibrated_mismatch":
            self._calibration(key, "method='calibrated_mismatch'")
        x_all = self._as_images(images, model)
        bs = self.settings["batch_size"] if batch_size is None else _check_setting(
            "batch_size", batch_size)
        from geokernels.anomaly._compat import anomaly_score_op, flow_mismatch_op

        flow_mismatch, anomaly_score = flow_mismatch_op(), anomaly_score_op()
        vel = self._velocity(model, class_index)
        s = self.settings
        starts = range(0, x_all.shape[0], bs)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"scoring ({method})", unit="batch", leave=False)
        heats = []
        for i in starts:
            x = self._model_space(x_all[i:i + bs].to(self.device))
            n = x.shape[0]
            if self.compile is not None and n < bs:
                # compiled graphs are shape-specialised: pad a short last batch (repeating its
                # last image; padded rows draw their own noise and are dropped) instead of
                # compiling (and capturing CUDA graphs) again for every odd batch size
                x = torch.cat([x, x[-1:].expand(bs - n, *x.shape[1:])])
            if method == "reconstruction":
                h = reconstruction_heatmap(vel, x, t0=s["reconstruction_t0"],
                                           steps=s["reconstruction_steps"],
                                           solver=s["reconstruction_solver"], seed=s["seed"],
                                           paths=s["reconstruction_paths"], image_index_offset=i)
                if s["smooth_sigma"] > 0:   # as flow_mismatch smooths: methods compare alike
                    from geokernels.ops.flow_mismatch import smooth_heatmap

                    h = smooth_heatmap(h, s["smooth_sigma"])
            else:
                # noise keyed by the image's index in this call: independent of batch_size
                h = flow_mismatch(vel, x, K=s["K"], T=s["T"], agg=s["agg"], r=s["r"],
                                  seed=s["seed"], smooth_sigma=s["smooth_sigma"],
                                  image_index_offset=i, backend=self.backend,
                                  chunk=self._paths_per_call())
            heats.append(h[:n].float().cpu())
        heat = torch.cat(heats)
        if method == "calibrated_mismatch":  # the transform of the mismatch heatmaps just made
            return self.calibrated_from_mismatch(heat, category=category)
        scores = anomaly_score(heat, mode=s["score_mode"], topk=s["topk"])
        return heat, scores.float()

    def calibrate(self, normal_images, *, category=None, stats_sigma: float = 4.0,
                  min_std: float = 0.05, batch_size=None, progress=False) -> "FlowMismatchDetector":
        """Fit the non-default calibrated variant on held-out normal images (not the training
        images: their mismatch is optimistically low). Enables method="calibrated_mismatch"."""
        for name, value in (("stats_sigma", stats_sigma), ("min_std", min_std)):
            if isinstance(value, bool) or not isinstance(value, Real) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        _, _, key = self._member(category)
        heat, _ = self.score(normal_images, category=category, batch_size=batch_size,
                             progress=progress)
        self.calibrations[key] = MismatchCalibration(stats_sigma, min_std).fit(heat)
        return self

    def _calibration(self, key, caller: str) -> MismatchCalibration:
        if key not in self.calibrations:
            raise RuntimeError(f"{caller} needs calibrate(normal_images"
                               f"{'' if key is None else ', category=' + repr(key)}) first")
        return self.calibrations[key]

    def calibrated_from_mismatch(self, heatmaps: torch.Tensor, *, category=None):
        """(heatmaps, scores) of method="calibrated_mismatch" from the default mismatch heatmaps
        of the same images (``score(images)[0]``): no model call; this is how
        ``score(images, method="calibrated_mismatch")`` finishes, so the two are equal. Lets an
        evaluation report both methods from one scoring pass."""
        _, _, key = self._member(category)
        calibration = self._calibration(key, "calibrated_from_mismatch")
        if not isinstance(heatmaps, torch.Tensor) or not heatmaps.is_floating_point() or \
                heatmaps.dim() != 3 or heatmaps.shape[0] == 0:
            raise ValueError(f"heatmaps must be a non-empty floating-point (N, H, W) tensor, got "
                             f"{getattr(heatmaps, 'shape', type(heatmaps).__name__)}")
        from geokernels.anomaly._compat import anomaly_score_op

        heat = calibration.transform(heatmaps.float().cpu())
        s = self.settings
        return heat, anomaly_score_op()(heat, mode=s["score_mode"], topk=s["topk"]).float()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        self._require_fitted()
        import json

        try:   # load() reads with weights_only=True: plain JSON types only
            metadata = json.loads(json.dumps(self.metadata, allow_nan=True))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must hold JSON types only (str, int, float, bool, None, "
                            f"lists, dicts with str keys): {exc}") from None
        return {
            "format": DETECTOR_FORMAT, "version": FORMAT_VERSION,
            "members": {("" if k is None else k): {"model_config": m.config,
                                                    "ema": {n: p.detach().cpu() for n, p in
                                                            m.state_dict().items()}}
                        for k, m in self.members.items()},
            "single": None in self.members,
            "class_names": self.class_names,
            "settings": dict(self.settings),
            "calibrations": {("" if k is None else k): c.state_dict()
                             for k, c in self.calibrations.items()},
            "metadata": metadata,
        }

    def save(self, path) -> str:
        """Write the detector (configs, EMA weights, settings, calibration) atomically."""
        return save_atomic(self.state_dict(), path)

    @classmethod
    def load(cls, path, *, device=None, **overrides) -> "FlowMismatchDetector":
        """A detector from ``save`` output or from a training checkpoint (its EMA weights).

        Raises FileNotFoundError (missing file) or CheckpointError, a ValueError (corrupt,
        truncated or foreign file). ``overrides``: detector settings/options to change.
        """
        ckpt = load_checkpoint(path, formats=(DETECTOR_FORMAT, TRAIN_FORMAT))
        try:
            if ckpt["format"] == TRAIN_FORMAT:
                members = {None: (ckpt["model_config"], ckpt["ema"])}
                settings = {"input_range": ckpt.get("input_range", "[-1,1]")}
                class_names, calibrations = ckpt.get("class_names"), {}
            else:
                members = {(None if ckpt["single"] else k): (v["model_config"], v["ema"])
                           for k, v in ckpt["members"].items()}
                settings, class_names = dict(ckpt["settings"]), ckpt.get("class_names")
                calibrations = ckpt.get("calibrations") or {}
            models = {}
            for k, (config, weights) in members.items():
                m = VelocityUNet.from_config(config)
                m.load_state_dict(weights)
                models[k] = m
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} is malformed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        options = {k: overrides.pop(k) for k in ("precision", "compile", "backend")
                   if k in overrides}
        settings = {k: v for k, v in settings.items() if k in _DEFAULT_SETTINGS}
        settings.update(overrides)
        det = cls(models[None] if None in models else models, class_names=class_names,
                  device=device, **options, **settings)
        det.calibrations = {(None if k == "" else k):   # a conditional model keys by category
                            MismatchCalibration.from_state_dict(v)
                            for k, v in calibrations.items()}
        det.metadata = dict(ckpt.get("metadata") or {})
        return det

    @staticmethod
    def pretrained_path(name: str = "textures") -> str:
        if name not in PRETRAINED:
            raise ValueError(f"name must be one of {tuple(PRETRAINED)}, got {name!r}")
        from importlib import resources

        return str(resources.files("geokernels") / "assets" / PRETRAINED[name])

    @classmethod
    def pretrained(cls, name: str = "textures", *, device=None, **overrides):
        """The detector shipped inside the package (trained on the offline texture set by
        ``geokernels anomaly train --dataset textures``); no download, no training step."""
        path = cls.pretrained_path(name)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"the pretrained {name!r} checkpoint is not shipped in this build (expected "
                f"{path}); train one with `geokernels anomaly train --dataset textures` or load "
                f"your own with FlowMismatchDetector.load(path)")
        return cls.load(path, device=device, **overrides)

    def __repr__(self) -> str:
        if not self.members:
            return "FlowMismatchDetector(unfitted)"
        m = next(iter(self.members.values()))
        s = self.settings
        return (f"FlowMismatchDetector(models={len(self.members)}, params/model="
                f"{m.num_parameters() / 1e6:.2f}M, categories={self.categories}, K={s['K']}, "
                f"T={s['T']}, agg={s['agg']!r}, r={s['r']}, device={self.device})")
