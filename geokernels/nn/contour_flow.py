"""Modules of the Contour Flow family (SPEC.md 2.3-2.4): the shape loss and the CFSS block."""
from __future__ import annotations

import math

import torch
from torch import nn

from geokernels._backend import check_backend
from geokernels.ops.cfss import cfss_iterate
from geokernels.ops.contour_flow import contour_flow_loss

CFSS_SCALARS = ("eps", "tau", "lam", "sigma")


class ContourFlowLoss(nn.Module):
    """``|cos(grad sigmoid(logits), flow)|`` averaged (SPEC 2.3). forward(logits (B,C,H,W),
    flow (B,2C,H,W)) -> scalar (or the map with reduction="none")."""

    def __init__(self, eps: float = 1e-8, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        check_backend(backend)
        # the arguments are checked now (by the op, on a 2x2 dummy), not at the first forward
        contour_flow_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2), eps=eps,
                          reduction=reduction, backend="torch")
        self.eps, self.reduction, self.backend = eps, reduction, backend

    def forward(self, logits: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return contour_flow_loss(logits, flow, eps=self.eps, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction!r}"


def _inverse_softplus(v: float) -> float:
    return v + math.log(-math.expm1(-v))  # log(exp(v) - 1), stable for large v


class CFSSBlock(nn.Module):
    """Unrolled CFSS iterations as a layer (SPEC 2.4): forward(o (B,C,H,W), T (B,2C,H,W)) -> z.

    Args:
        iters, eps, tau, lam, sigma, halfsize, q_nonneg, checkpoint, backend: as
            :func:`geokernels.cfss_iterate`.
        learnable: False, True (all four scalars) or an iterable of names among
            ("eps", "tau", "lam", "sigma") to learn. A learnable scalar is stored as ``raw_<name>``
            with value ``softplus(raw)``, so it stays positive whatever the optimiser does.
    """

    def __init__(self, iters: int = 50, eps: float = 1.0, tau: float = 1.0, lam: float = 1.0,
                 sigma: float = 5.0, halfsize: int = 2, q_nonneg: bool = False, learnable=False,
                 checkpoint="auto", backend: str = "auto"):
        super().__init__()
        if learnable is True:
            learn = set(CFSS_SCALARS)
        elif learnable is False or learnable is None:
            learn = set()
        else:
            learn = {learnable} if isinstance(learnable, str) else set(learnable)
            unknown = learn - set(CFSS_SCALARS)
            if unknown:
                raise ValueError(f"learnable must name scalars among {CFSS_SCALARS}, got {sorted(unknown)}")
        check_backend(backend)
        from geokernels.ops._validate import check_int

        check_int(iters, "iters", min_value=0)
        # every other argument is checked now by the op (0 iterations on a 2x2 dummy), not at the
        # first forward
        cfss_iterate(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2), iters=0, eps=eps, tau=tau,
                     lam=lam, sigma=sigma, halfsize=halfsize, q_nonneg=q_nonneg,
                     checkpoint=checkpoint, backend="torch")
        self.iters, self.halfsize, self.q_nonneg = iters, halfsize, q_nonneg
        self.checkpoint, self.backend = checkpoint, backend
        self.learnable = tuple(n for n in CFSS_SCALARS if n in learn)
        values = dict(eps=eps, tau=tau, lam=lam, sigma=sigma)
        for name, v in values.items():
            v = float(v)
            if name in learn:
                if not v > 0:
                    raise ValueError(f"{name} must be > 0 to be learnable (softplus parametrisation), got {v}")
                self.register_parameter(f"raw_{name}", nn.Parameter(torch.tensor(_inverse_softplus(v))))
            else:
                setattr(self, f"_{name}", v)

    def value(self, name: str):
        """The current value of a scalar: a 0-dim tensor if learnable, else a float."""
        if name in self.learnable:
            return nn.functional.softplus(getattr(self, f"raw_{name}"))
        return getattr(self, f"_{name}")

    def forward(self, o: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        scalars = {n: self.value(n) for n in CFSS_SCALARS}
        for n in self.learnable:
            scalars[n] = scalars[n].to(o.dtype)
        return cfss_iterate(o, T, iters=self.iters, halfsize=self.halfsize, q_nonneg=self.q_nonneg,
                            checkpoint=self.checkpoint, backend=self.backend, **scalars)

    def _repr_value(self, name: str) -> str:
        v = self.value(name)
        if isinstance(v, torch.Tensor):
            if v.is_meta:   # deferred init: no value yet
                return f"{name}=<learnable>"
            v = float(v.detach())
        return f"{name}={v:.4g}"

    def extra_repr(self) -> str:
        vals = ", ".join(self._repr_value(n) for n in CFSS_SCALARS)
        return (f"iters={self.iters}, {vals}, halfsize={self.halfsize}, q_nonneg={self.q_nonneg}, "
                f"learnable={self.learnable}, checkpoint={self.checkpoint!r}")
