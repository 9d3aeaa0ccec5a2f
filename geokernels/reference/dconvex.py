"""Pure-PyTorch oracle for the D-Convexity family (SPEC.md section 1).

Literal transcriptions of the SPEC, written for clarity rather than speed. Every kernel backend
is tested against these functions; do not tune them to match a kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def diff_x(f: torch.Tensor) -> torch.Tensor:
    """SPEC 1.1 ``Dx f[i,j] = f[i,j] - f[i,j-1]`` for j >= 1, 0 at j = 0 (last dim)."""
    return torch.diff(f, dim=-1, prepend=f[..., :1])


def diff_y(f: torch.Tensor) -> torch.Tensor:
    """SPEC 1.1 ``Dy f[i,j] = f[i,j] - f[i-1,j]`` for i >= 1, 0 at i = 0 (second-to-last dim)."""
    return torch.diff(f, dim=-2, prepend=f[..., :1, :])


def _reduce(loss_map: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss_map.mean()
    if reduction == "sum":
        return loss_map.sum()
    if reduction == "none":
        return loss_map
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def qc2_loss_map(
    u: torch.Tensor,
    margin: float = 1e-3,
    beta: float = 1.0,
    eps: float = 1e-8,
    grad_threshold: float = 1e-5,
    activation: str = "softplus",
) -> torch.Tensor:
    """Per-pixel second-order quasi-concavity loss ``l`` (SPEC 1.2), shape of ``u`` (B, C, H, W)."""
    ux = diff_x(u)
    uy = diff_y(u)
    uxx = diff_x(ux)
    uyy = diff_y(uy)
    uxy = diff_y(ux)
    uyx = diff_x(uy)
    m = (uxy + uyx) / 2
    s = ux * ux + uy * uy + eps
    # g = sqrt(s). With eps = 0 a flat pixel has s = 0, where sqrt has no derivative; the mask
    # below removes such pixels (g = 0 <= grad_threshold), so we take the subgradient 0 there
    # instead of letting 0 * inf poison the backward with NaN. Identical values wherever s > 0.
    positive = s > 0
    g = torch.where(positive, torch.sqrt(torch.where(positive, s, torch.ones_like(s))), torch.zeros_like(s))
    mask = g > grad_threshold
    g_safe = torch.where(mask, g, torch.ones_like(g))
    t1 = -uy / g_safe
    t2 = ux / g_safe
    q = t1 * t1 * uxx + 2 * t1 * t2 * m + t2 * t2 * uyy
    x = torch.where(mask, q + margin, torch.zeros_like(q))
    if activation == "softplus":
        phi = F.softplus(x, beta=beta, threshold=20.0)
    elif activation == "relu":
        phi = torch.relu(x)
    else:
        raise ValueError(f"activation must be 'softplus' or 'relu', got {activation!r}")
    return phi * g


def qc2_loss(
    u: torch.Tensor,
    margin: float = 1e-3,
    beta: float = 1.0,
    eps: float = 1e-8,
    grad_threshold: float = 1e-5,
    activation: str = "softplus",
    reduction: str = "mean",
) -> torch.Tensor:
    """Second-order quasi-concavity loss (SPEC 1.2). ``u``: (B, C, H, W) -> scalar or map."""
    return _reduce(qc2_loss_map(u, margin, beta, eps, grad_threshold, activation), reduction)
