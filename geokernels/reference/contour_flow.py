"""Pure-PyTorch oracle for the Contour Flow family (SPEC.md section 2).

Shared difference operators (SPEC 2.1) live here; the flow field, the shape loss and the CFSS
iterations are added below them by their op families.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BORDERS = ("zero-pad", "valid")


def grad_forward(f: torch.Tensor, border: str = "zero-pad") -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of SPEC 2.1 on the last two dims: (d0, d1) with
    ``d0[i,j] = f[i+1,j] - f[i,j]`` (rows) and ``d1[i,j] = f[i,j+1] - f[i,j]`` (columns).

    border="zero-pad": f outside the image is 0 (last row: d0 = -f[H-1, j]).
    border="valid": computed for 1 <= i <= H-2, 1 <= j <= W-2 only; every border pixel is 0.
    """
    if border == "zero-pad":
        fp = F.pad(f, (0, 1, 0, 1))  # one zero row below, one zero column right
        d0 = fp[..., 1:, :-1] - f
        d1 = fp[..., :-1, 1:] - f
        return d0, d1
    if border == "valid":
        H, W = f.shape[-2:]
        d0 = torch.zeros_like(f)
        d1 = torch.zeros_like(f)
        if H >= 3 and W >= 3:
            d0[..., 1:-1, 1:-1] = f[..., 2:, 1:-1] - f[..., 1:-1, 1:-1]
            d1[..., 1:-1, 1:-1] = f[..., 1:-1, 2:] - f[..., 1:-1, 1:-1]
        return d0, d1
    raise ValueError(f"border must be one of {BORDERS}, got {border!r}")


def div_backward(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SPEC 2.4 ``div^-(v)[i,j] = (v0[i,j] - v0[i-1,j]) + (v1[i,j] - v1[i,j-1])``, v outside = 0.

    Exactly the negative adjoint of ``grad_forward(., "zero-pad")``.
    """
    v0p = F.pad(v0, (0, 0, 1, 0))  # a zero row above
    v1p = F.pad(v1, (1, 0, 0, 0))  # a zero column left
    return (v0 - v0p[..., :-1, :]) + (v1 - v1p[..., :, :-1])


# ---- SPEC 2.3-2.4: contour-flow shape loss, CFSS iterations (op family "cfss") --------------


def split_flow(flow: torch.Tensor, channels: int) -> torch.Tensor:
    """View a (B, 2C, H, W) flow as (B, C, 2, H, W): class c owns flow channels 2c (row
    component, pairs with d0) and 2c + 1 (column component, pairs with d1)."""
    B, _, H, W = flow.shape
    return flow.reshape(B, channels, 2, H, W)


def contour_flow_loss_map(logits: torch.Tensor, flow: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-pixel ``|cos(grad u, F)|`` of SPEC 2.3, shape of ``logits`` (B, C, H, W).

    ``u = sigmoid(logits)``, ``grad u`` = forward differences with zero padding (SPEC 2.1), and the
    cosine is ``torch.nn.functional.cosine_similarity`` (norms clamped below at ``eps``).
    """
    u = torch.sigmoid(logits)
    d0, d1 = grad_forward(u, "zero-pad")
    grad_u = torch.stack((d0, d1), dim=2)  # (B, C, 2, H, W)
    cos = F.cosine_similarity(grad_u, split_flow(flow, logits.shape[1]), dim=2, eps=eps)
    return cos.abs()


def contour_flow_loss(logits: torch.Tensor, flow: torch.Tensor, eps: float = 1e-8,
                      reduction: str = "mean") -> torch.Tensor:
    """Contour-flow shape loss (SPEC 2.3). logits (B, C, H, W), flow (B, 2C, H, W).

    "mean": mean over pixels (B, H, W) of |c|, then mean over channels; "sum"; "none": the map.
    """
    loss_map = contour_flow_loss_map(logits, flow, eps)
    if reduction == "mean":
        return loss_map.mean(dim=(0, 2, 3)).mean()
    if reduction == "sum":
        return loss_map.sum()
    if reduction == "none":
        return loss_map
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def gaussian_kernel(sigma, halfsize: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """SPEC 2.4 ``k``: (2h+1)^2 taps ``exp(-(x^2+y^2)/(2 sigma^2)) / (sum + 1e-15)``.

    ``sigma`` may be a 0-dim tensor (the kernel is then differentiable in it).
    """
    r = torch.arange(-halfsize, halfsize + 1, dtype=dtype, device=device)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    g = torch.exp(-(xx * xx + yy * yy) / (2 * sigma * sigma))
    return g / (g.sum() + 1e-15)


def cfss_iterate(o: torch.Tensor, T: torch.Tensor, iters: int = 50, eps=1.0, tau=1.0, lam=1.0,
                 sigma=5.0, halfsize: int = 2, q_nonneg: bool = False) -> torch.Tensor:
    """Unrolled CFSS iterations (SPEC 2.4), a literal loop. o (B, C, H, W) logits (the SPEC's
    C = 1; classes are independent), T (B, 2C, H, W) unit field; returns z (B, C, H, W).

    ``max(q, 0)`` is ``torch.relu`` (subgradient 0 at q = 0). ``iters = 0`` returns ``o / eps``
    (the logits of the initial u). eps, tau, lam, sigma may be 0-dim tensors.
    """
    C = o.shape[1]
    k = gaussian_kernel(sigma, halfsize, o.dtype, o.device)
    weight = k.expand(C, 1, 2 * halfsize + 1, 2 * halfsize + 1)
    Tc = split_flow(T, C)
    T0, T1 = Tc[:, :, 0], Tc[:, :, 1]
    z = o / eps
    u = torch.sigmoid(z)
    q = torch.zeros_like(o)
    for _ in range(iters):
        p = F.conv2d(1 - 2 * u, weight, padding=halfsize, groups=C)  # zero padding, correlation
        d0, d1 = grad_forward(u, "zero-pad")
        q = q - tau * (T0 * d0 + T1 * d1)
        if q_nonneg:
            q = torch.relu(q)
        D = div_backward(T0 * q, T1 * q)
        z = (o - lam * p - D) / eps
        u = torch.sigmoid(z)
    return z


def cfss_constraint_residual(z: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """mean |<grad+ sigmoid(z), T>| per image: the constraint the dual variable enforces."""
    u = torch.sigmoid(z)
    Tc = split_flow(T, z.shape[1])
    d0, d1 = grad_forward(u, "zero-pad")
    return (Tc[:, :, 0] * d0 + Tc[:, :, 1] * d1).abs().mean(dim=(1, 2, 3))
