"""D-Convexity modules (SPEC.md 1.2-1.5): the quasi-concavity losses and the CGPM refinement.

    loss = QuasiConcavityLoss(order=2)(torch.sigmoid(logits))        # shape prior for training
    probs = CGPM(steps=100, method="c2")(logits)                      # parameter-free refinement
    model = SegmentationWithCGPM(unet, steps=100)                     # backbone + CGPM
    mask = model.predict_mask(images)                                 # uint8 (B, C, H, W)
"""
from __future__ import annotations

import torch
from torch import nn

from geokernels._backend import check_backend
from geokernels.ops import cgpm as _cgpm_op
from geokernels.ops.cgpm import METHODS
from geokernels.ops.qc_loss import qc1_loss, qc2_loss
from geokernels.ops._validate import check_choice, check_int, check_real


def threshold_mask(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The super-level set ``{probs >= threshold}`` as a uint8 mask (1 inside), shape of probs.
    For a quasi-concave ``probs`` every such set is convex (SPEC 1)."""
    threshold = check_real(threshold, "threshold")
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    return (probs >= threshold).to(torch.uint8)


class QuasiConcavityLoss(nn.Module):
    """Quasi-concavity shape prior on a mask function u in [0, 1] (SPEC.md 1.2 / 1.3).

    Args:
        order: 2 for the second-order loss ``qc2_loss`` (kwargs: margin, beta, eps,
            grad_threshold, activation), 1 for the first-order ``qc1_loss`` (kwargs: window).
        reduction: "mean" | "sum" | "none".
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch".

    forward(u): u (B, C, H, W) -> scalar (or the (B, C, H, W) map for reduction="none").
    """

    def __init__(self, order: int = 2, reduction: str = "mean", backend: str = "auto", **loss_kwargs):
        super().__init__()
        if isinstance(order, bool) or order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        allowed = ("margin", "beta", "eps", "grad_threshold", "activation") if order == 2 else ("window",)
        unknown = sorted(set(loss_kwargs) - set(allowed))
        if unknown:
            raise TypeError(f"QuasiConcavityLoss(order={order}) got unexpected argument(s) {unknown}; "
                            f"it accepts {list(allowed)}")
        check_backend(backend)
        # the arguments are checked now (by the op, on an 8x8 dummy), not at the first forward
        (qc2_loss if order == 2 else qc1_loss)(torch.full((1, 1, 8, 8), 0.5), reduction=reduction,
                                                backend="torch", **loss_kwargs)
        self.order = order
        self.reduction = reduction
        self.backend = backend
        self.loss_kwargs = dict(loss_kwargs)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        fn = qc2_loss if self.order == 2 else qc1_loss
        return fn(u, reduction=self.reduction, backend=self.backend, **self.loss_kwargs)

    def extra_repr(self) -> str:
        kw = "".join(f", {k}={v!r}" for k, v in self.loss_kwargs.items())
        return f"order={self.order}, reduction={self.reduction!r}{kw}"


class CGPM(nn.Module):
    """Convex gradient projection module (SPEC.md 1.5): parameter-free refinement of raw mask
    logits into quasi-concave probabilities by ``steps`` unrolled Adam steps (fused kernels).

    Args: as :func:`geokernels.cgpm` (steps, lr, method, weight, betas, adam_eps,
        backprop_to_backbone, backend, loss kwargs), plus ``threshold`` for :meth:`mask`.

    forward(logits): (B, C, H, W) -> refined probabilities (B, C, H, W). After a forward,
    ``last_history`` holds the (steps,) loss history when ``track_history`` is set.
    """

    def __init__(self, steps: int = 100, lr: float = 1e-2, method: str = "c2", weight: float = 1.0,
                 betas=(0.9, 0.999), adam_eps: float = 1e-8, backprop_to_backbone: bool = False,
                 threshold: float = 0.5, track_history: bool = False, backend: str = "auto",
                 **loss_kwargs):
        super().__init__()
        check_choice(method, "method", METHODS)
        check_backend(backend)
        if not isinstance(track_history, bool):
            raise TypeError(f"track_history must be a bool, got {type(track_history).__name__}")
        self.threshold = check_real(threshold, "threshold")
        steps = check_int(steps, "steps", min_value=0)
        self.steps, self.lr, self.method, self.weight = steps, lr, method, weight
        self.betas, self.adam_eps = tuple(betas), adam_eps
        self.backprop_to_backbone = backprop_to_backbone
        self.track_history = track_history
        self.backend = backend
        self.loss_kwargs = dict(loss_kwargs)
        self.last_history: torch.Tensor | None = None
        # validate the other arguments now rather than at the first forward
        _cgpm_op(torch.zeros(1, 1, 1, 1), steps=0, lr=lr, method=method, weight=weight, betas=betas,
                 adam_eps=adam_eps, backprop_to_backbone=backprop_to_backbone, backend="torch",
                 **loss_kwargs)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        out = _cgpm_op(logits, steps=self.steps, lr=self.lr, method=self.method, weight=self.weight,
                       betas=self.betas, adam_eps=self.adam_eps,
                       return_history=self.track_history,
                       backprop_to_backbone=self.backprop_to_backbone, backend=self.backend,
                       **self.loss_kwargs)
        if self.track_history:
            out, self.last_history = out
        return out

    def mask(self, logits: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Refine ``logits`` and threshold: uint8 (B, C, H, W), 1 where probs >= threshold."""
        with torch.no_grad():
            probs = self.forward(logits)
        return threshold_mask(probs, self.threshold if threshold is None else threshold)

    def extra_repr(self) -> str:
        kw = "".join(f", {k}={v!r}" for k, v in self.loss_kwargs.items())
        return (f"steps={self.steps}, lr={self.lr}, method={self.method!r}, weight={self.weight}"
                f", betas={self.betas}, adam_eps={self.adam_eps}, threshold={self.threshold}"
                f", backprop_to_backbone={self.backprop_to_backbone}{kw}")


class SegmentationWithCGPM(nn.Module):
    """A segmentation backbone followed by CGPM: ``forward(x)`` returns the refined
    probabilities (B, C, H, W) of ``backbone(x)``'s logits.

    Args:
        backbone: module mapping images to (B, C, H, W) mask logits.
        cgpm: a :class:`CGPM`; if None one is built from ``cgpm_kwargs``.
        **cgpm_kwargs: arguments of :class:`CGPM` (steps, method, backprop_to_backbone, ...).

    With ``backprop_to_backbone=True`` a loss on the refined probabilities trains the backbone
    through all CGPM steps; otherwise train the backbone on ``forward(x, return_logits=True)``'s
    logits and use CGPM at inference.
    """

    def __init__(self, backbone: nn.Module, cgpm: CGPM | None = None, **cgpm_kwargs):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        if cgpm is not None and cgpm_kwargs:
            raise TypeError("pass either cgpm or CGPM keyword arguments, not both")
        if cgpm is not None and not isinstance(cgpm, CGPM):
            raise TypeError(f"cgpm must be a geokernels.nn.CGPM, got {type(cgpm).__name__}")
        self.backbone = backbone
        self.cgpm = cgpm if cgpm is not None else CGPM(**cgpm_kwargs)

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        logits = self.backbone(x)
        probs = self.cgpm(logits)
        return (probs, logits) if return_logits else probs

    def predict_mask(self, x: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """uint8 (B, C, H, W) mask of the refined probabilities (>= threshold, default the
        CGPM's)."""
        with torch.no_grad():
            probs = self.forward(x)
        return threshold_mask(probs, self.cgpm.threshold if threshold is None else threshold)
