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
