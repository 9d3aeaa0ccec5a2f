"""CFSSnet (SPEC.md 2.5): a backbone with a 3-channel head (segmentation logit o and a 2-channel
contour flow, normalised per pixel) and the unrolled CFSS iterations on top."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from geokernels._checks import values_checked
from geokernels.models.unet import UNet
from geokernels.nn.contour_flow import CFSSBlock
from geokernels.ops.contour_flow import contour_flow_loss
from geokernels.reference.contour_flow import grad_forward


def _flow_field_scipy(mask: torch.Tensor) -> torch.Tensor:
    """SPEC 2.2 with scipy's exact EDT (default options): (B, C, H, W) binary -> (B, 2C, H, W)."""
    from scipy.ndimage import distance_transform_edt

    m_np = (mask.detach().cpu().numpy() > 0.5)
    d_in = np.zeros(m_np.shape, dtype=np.float64)
    d_out = np.zeros(m_np.shape, dtype=np.float64)
    for idx in np.ndindex(*m_np.shape[:2]):
        d_in[idx] = distance_transform_edt(m_np[idx])
        d_out[idx] = distance_transform_edt(~m_np[idx])
    m = torch.from_numpy(m_np.astype(np.float64))
    di, do = torch.from_numpy(d_in), torch.from_numpy(d_out)
    a0, a1 = grad_forward(di, "valid")
    b0, b1 = grad_forward(-do, "valid")
    g0 = a0 * m + b0 * (1 - m)
    g1 = a1 * m + b1 * (1 - m)
    norm = torch.sqrt(g0 * g0 + g1 * g1).clamp_min(1e-20)
    n0, n1 = g0 / norm, g1 / norm
    flow = torch.stack((-n1, n0), dim=2)  # (B, C, 2, H, W): rotate by +90 degrees
    # an all-0 or all-1 plane has no contour: zero flow, as contour_flow_field (scipy's EDT of a
    # plane without background is no distance to anything)
    flat = m.flatten(2)
    flow = flow * (flat.amin(dim=2) != flat.amax(dim=2))[..., None, None, None]
    B, C, H, W = mask.shape
    return flow.reshape(B, 2 * C, H, W).to(dtype=mask.dtype if mask.is_floating_point() else torch.float32,
                                            device=mask.device)


def ground_truth_flow(mask: torch.Tensor) -> torch.Tensor:
    """Contour flow of a mask (SPEC 2.2), (B, C, H, W) -> (B, 2C, H, W) float32; the mask is
    binarised at 0.5. Uses the fused ``geokernels.contour_flow_field`` (scipy's EDT as a fallback
    for builds without it)."""
    import geokernels

    field = getattr(geokernels, "contour_flow_field", None)
    if field is not None:
        return field(mask, threshold=0.5)
    return _flow_field_scipy(mask).to(torch.float32)


def _unpack(batch):
    if isinstance(batch, dict):
        image = batch.get("image")
        mask = batch.get("mask")
        flow = batch.get("flow")
    elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        image, mask = batch[0], batch[1]
        flow = batch[2] if len(batch) == 3 else None
    else:
        raise TypeError("batch must be a dict with 'image', 'mask' (and optionally 'flow') or a "
                        f"tuple (image, mask[, flow]), got {type(batch).__name__}")
    if image is None or mask is None:
        raise ValueError("batch must provide 'image' and 'mask'")
    return image, mask, flow


class CFSSNet(nn.Module):
    """CFSSnet: ``backbone(x)`` -> 3 channels (o, flow), ``z = cfss_iterate(o, normalise(flow))``.

    Args:
        backbone: a module mapping (B, in_channels, H, W) to (B, 3, H, W); default
            ``UNet(in_channels, 3, depth=4, width=32)``.
        in_channels: image channels (used for the default backbone only).
        iters, eps, tau, lam, sigma, halfsize, q_nonneg, learnable, checkpoint, backend: the CFSS
            block (:class:`geokernels.nn.CFSSBlock`).
        alpha: weight of the flow term of the training loss (SPEC 2.5: 0.1).
        shape_weight: weight of the optional contour-flow shape loss (SPEC 2.3) on z (0 = off).
        flow_eps: the per-pixel normalisation is ``f / max(|f|, flow_eps)``.

    forward(x) -> dict(logits=z (B,1,H,W), o=(B,1,H,W), flow=(B,2,H,W) unit field).
    """

    def __init__(self, backbone: nn.Module | None = None, in_channels: int = 1, iters: int = 50,
                 eps: float = 1.0, tau: float = 1.0, lam: float = 1.0, sigma: float = 5.0,
                 halfsize: int = 2, q_nonneg: bool = False, learnable=False, checkpoint="auto",
                 backend: str = "auto", alpha: float = 0.1, shape_weight: float = 0.0,
                 flow_eps: float = 1e-6):
        super().__init__()
        if backbone is not None and not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module mapping (B, C, H, W) to (B, 3, H, W), "
                            f"got {type(backbone).__name__}")
        for name, v, positive in (("alpha", alpha, False), ("shape_weight", shape_weight, False),
                                  ("flow_eps", flow_eps, True)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or \
                    v < 0 or (positive and v == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {v!r}")
        self.backbone = backbone if backbone is not None else UNet(in_channels, 3, depth=4, width=32)
        self.cfss = CFSSBlock(iters=iters, eps=eps, tau=tau, lam=lam, sigma=sigma, halfsize=halfsize,
                              q_nonneg=q_nonneg, learnable=learnable, checkpoint=checkpoint,
                              backend=backend)
        self.alpha, self.shape_weight, self.flow_eps = float(alpha), float(shape_weight), float(flow_eps)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, shape_weight={self.shape_weight}, flow_eps={self.flow_eps}"

    def forward(self, x: torch.Tensor) -> dict:
        head = self.backbone(x)
        if head.dim() != 4 or head.shape[1] != 3:
            raise ValueError(f"the backbone must return (B, 3, H, W) (logit + 2-channel flow), got "
                             f"{tuple(head.shape)}")
        o = head[:, :1]
        f = head[:, 1:3]
        flow = f / f.norm(dim=1, keepdim=True).clamp_min(self.flow_eps)
        z = self.cfss(o.contiguous(), flow.contiguous())
        return {"logits": z, "o": o, "flow": flow}

    def loss(self, batch, outputs: dict | None = None) -> tuple[torch.Tensor, dict]:
        """SPEC 2.5: ``BCEWithLogits(z, gt) + alpha * mean(1 - cos(F_hat, F_gt))``
        (+ ``shape_weight * contour_flow_loss(z, F_gt)``). ``batch``: dict with "image" and
        "mask" (B,1,H,W) and optionally "flow" (B,2,H,W, else computed from the mask), or a tuple.
        Returns (total, {"bce", "flow", "shape"} as detached floats)."""
        image, mask, flow_gt = _unpack(batch)
        out = outputs if outputs is not None else self(image)
        z, flow = out["logits"], out["flow"]
        if tuple(mask.shape) != tuple(z.shape):
            raise ValueError(f"mask must have the shape of the logits {tuple(z.shape)}, got "
                             f"{tuple(mask.shape)}")
        # a value scan syncs a CUDA device (CPU only by default) and cannot run under a tracer
        if mask.numel() and values_checked(mask) and (mask.min() < 0 or mask.max() > 1):
            raise ValueError(f"mask values must lie in [0, 1] (a 0/255 mask would train BCE "
                             f"against 255), got [{float(mask.min())}, {float(mask.max())}]")
        if flow_gt is not None and tuple(flow_gt.shape) != tuple(flow.shape):
            raise ValueError(f"flow must have shape {tuple(flow.shape)} (B, 2, H, W) like the "
                             f"logits, got {tuple(flow_gt.shape)} (it would broadcast)")
        mask = mask.to(z.dtype)
        if flow_gt is None:
            with torch.no_grad():
                flow_gt = ground_truth_flow(mask)
        flow_gt = flow_gt.to(device=z.device, dtype=z.dtype)
        bce = F.binary_cross_entropy_with_logits(z, mask)
        flow_term = (1 - F.cosine_similarity(flow, flow_gt, dim=1)).mean()
        total = bce + self.alpha * flow_term
        parts = {"bce": float(bce.detach()), "flow": float(flow_term.detach()), "shape": 0.0}
        if self.shape_weight > 0:
            shape = contour_flow_loss(z, flow_gt, backend=self.backend)
            total = total + self.shape_weight * shape
            parts["shape"] = float(shape.detach())
        return total, parts

    @torch.no_grad()
    def predict(self, x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Binary mask (B, 1, H, W) uint8: sigmoid(z) > threshold."""
        return (torch.sigmoid(self(x)["logits"]) > threshold).to(torch.uint8)
