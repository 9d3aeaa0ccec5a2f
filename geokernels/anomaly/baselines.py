"""Comparison scores computed with the same velocity model as the mismatch score.

* ``reconstruction_heatmap``: the reconstruction baseline the paper compares against. Noise the
  test image to time t0 along the training path, x_t0 = (1 - t0)*eps + t0*x, integrate the learned
  ODE dx/dt = v(x, t) from t0 to t = 1 (Euler or Heun steps), score each pixel by the squared
  reconstruction error sum_c (x_hat - x)^2 (averaged over ``paths`` noise draws).
* ``MismatchCalibration``: the optional, non-default *calibrated mismatch*: standardise the
  (log) mismatch heatmap by its per-pixel mean and standard deviation over held-out normal images,
  and flag deviations either way, z(p) = |log H(p) - mu(p)| / sigma(p). A region that is *too easy*
  to denoise (e.g. a smooth patch pasted into busy grass) then scores high as well.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

SOLVERS = ("euler", "heun")


def _noise_like(x: torch.Tensor, seed: int, path: int, offset: int = 0) -> torch.Tensor:
    """Noise of image b from (seed, offset + b, path): independent of the batch size used."""
    from geokernels.anomaly.train import _mix_seed

    out = torch.empty(x.shape, dtype=torch.float32)
    for b in range(x.shape[0]):
        g = torch.Generator().manual_seed(_mix_seed(seed, 101, offset + b, path))
        out[b] = torch.randn(x.shape[1:], generator=g)
    return out.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def reconstruction_heatmap(velocity, x: torch.Tensor, t0: float = 0.5, steps: int = 8,
                           solver: str = "heun", seed: int = 0, paths: int = 1,
                           noise: torch.Tensor | None = None,
                           image_index_offset: int = 0) -> torch.Tensor:
    """Per-pixel reconstruction error (B, H, W) of ``x`` (B, C, H, W) through the learned ODE.

    Args:
        velocity: callable v(x_t, t) with t of shape (N,), returning (N, C, H, W).
        x: images in the model's space (the detector maps [0, 1] images first).
        t0: noising time in (0, 1): smaller = more noise = stronger "repair".
        steps: ODE steps from t0 to 1; solver "euler" or "heun" (2 model calls per step,
            the last Heun step ends exactly at t = 1).
        seed / paths: noise draws (averaged); ``noise`` (paths, B, C, H, W) overrides them.
        image_index_offset: index of x[0] in the whole set (noise is keyed by it).
    """
    if not 0.0 < float(t0) < 1.0:
        raise ValueError(f"t0 must be in (0, 1), got {t0!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(paths, bool) or not isinstance(paths, int) or paths < 1:
        raise ValueError(f"paths must be a positive int, got {paths!r}")
    if noise is not None and (noise.dim() != 5 or tuple(noise.shape[1:]) != tuple(x.shape)):
        raise ValueError(f"noise must have shape (paths, {', '.join(map(str, x.shape))}), got "
                         f"{tuple(noise.shape)}")
    n_paths = paths if noise is None else noise.shape[0]
    B = x.shape[0]
    heat = torch.zeros(B, x.shape[2], x.shape[3], dtype=torch.float32, device=x.device)
    dt = (1.0 - t0) / steps
    for p in range(n_paths):
        eps = _noise_like(x, seed, p, image_index_offset) if noise is None else noise[p].to(x)
        z = (1 - t0) * eps + t0 * x
        for i in range(steps):
            t = t0 + i * dt
            tt = torch.full((B,), t, dtype=x.dtype, device=x.device)
            v = velocity(z, tt).to(x.dtype)
            if solver == "euler":
                z = z + dt * v
            else:
                # a CUDA-graph compiled velocity (compile="reduce-overhead") overwrites its output
                # buffer on the next call: keep v's values across the corrector's call
                v = v.clone()
                z_pred = z + dt * v
                v2 = velocity(z_pred, torch.full_like(tt, t + dt)).to(x.dtype)
                z = z + 0.5 * dt * (v + v2)
        heat += ((z - x) ** 2).sum(dim=1).float()
    return heat / n_paths


def _gaussian_blur(h: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, reflect borders (for the statistics only)."""
    if sigma <= 0:
        return h
    radius = max(1, min(int(math.ceil(3 * sigma)), min(h.shape[-2:]) - 1))
    xs = torch.arange(-radius, radius + 1, dtype=h.dtype, device=h.device)
    k = torch.exp(-xs ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    y = F.pad(h[:, None], (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1))[:, 0]


class MismatchCalibration:
    """Per-pixel statistics of the log-mismatch on held-out normal images (non-default variant).

    ``fit(heatmaps)`` with (N, H, W) mismatch heatmaps of normal images stores mu, sigma (H, W)
    of log(H + floor); statistics are smoothed with a Gaussian of ``stats_sigma`` pixels (per-pixel
    estimates from a few dozen images are noisy) and sigma is floored at ``min_std``.
    ``transform(heatmaps)`` returns z = |log(H + floor) - mu| / sigma (two-sided).
    """

    def __init__(self, stats_sigma: float = 4.0, min_std: float = 0.05, floor: float | None = None):
        self.stats_sigma = float(stats_sigma)
        self.min_std = float(min_std)
        self.floor = floor
        self.mean = None
        self.std = None

    def fit(self, heatmaps: torch.Tensor) -> "MismatchCalibration":
        if not isinstance(heatmaps, torch.Tensor) or heatmaps.dim() != 3 or heatmaps.shape[0] < 2:
            raise ValueError("calibration needs (N, H, W) heatmaps of N >= 2 held-out normal "
                             f"images, got {tuple(getattr(heatmaps, 'shape', ()))}")
        h = heatmaps.detach().float().cpu()
        if self.floor is None:  # scale-free floor: a small fraction of the typical mismatch
            self.floor = float(h.median()) * 1e-3 + 1e-12
        logh = torch.log(h + self.floor)
        raw_mean = logh.mean(dim=0, keepdim=True)
        raw_var = ((logh - raw_mean) ** 2).mean(dim=0, keepdim=True)
        mean = _gaussian_blur(raw_mean, self.stats_sigma)
        # pooled second moment about the smoothed mean (includes the mean's spatial wiggle)
        var = _gaussian_blur(raw_var + (raw_mean - mean) ** 2, self.stats_sigma)
        self.mean = mean[0]
        self.std = var[0].clamp_min(0).sqrt().clamp_min(self.min_std)
        return self

    def transform(self, heatmaps: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError("MismatchCalibration.transform called before fit")
        if tuple(heatmaps.shape[-2:]) != tuple(self.mean.shape):
            raise ValueError(f"heatmaps of size {tuple(heatmaps.shape[-2:])} do not match the "
                             f"calibration size {tuple(self.mean.shape)}")
        mean, std = self.mean.to(heatmaps.device), self.std.to(heatmaps.device)
        return (torch.log(heatmaps.float() + self.floor) - mean).abs() / std

    def state_dict(self) -> dict:
        return {"stats_sigma": self.stats_sigma, "min_std": self.min_std, "floor": self.floor,
                "mean": self.mean, "std": self.std}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MismatchCalibration":
        obj = cls(state["stats_sigma"], state["min_std"], state["floor"])
        obj.mean, obj.std = state["mean"], state["std"]
        return obj
