"""Quasi-concavity (D-Convexity) losses: public API, fake kernels and autograd (SPEC.md 1.2).

The C++/CUDA kernels are ``torch.ops.geokernels.qc2_loss_forward/backward``; the backward is
closed form (no autograd graph through the stencils).
"""
from __future__ import annotations

import torch

from geokernels import _extension
from geokernels._backend import register_op, resolve
from geokernels.ops._validate import REDUCTIONS, check_choice, check_image, check_real
from geokernels.reference import dconvex as _ref

QC2_ACTIVATIONS = ("softplus", "relu")

register_op("qc2_loss", ("cpu", "cuda", "triton"))


def qc2_loss(
    u: torch.Tensor,
    margin: float = 1e-3,
    beta: float = 1.0,
    eps: float = 1e-8,
    grad_threshold: float = 1e-5,
    activation: str = "softplus",
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Second-order quasi-concavity loss of a mask function (SPEC.md 1.2).

    Args:
        u: (B, C, H, W) mask values, float32/float64 (float16/bfloat16 on CUDA, computed in
            float32). Each channel is treated independently.
        margin: added to the tangential second derivative Q before the activation.
        beta: softplus sharpness (PyTorch semantics, linear above beta*x > 20).
        eps: added under the gradient-norm square root; 0 is allowed.
        grad_threshold: pixels with |grad u| <= grad_threshold contribute only phi(0)*|grad u|.
        activation: "softplus" (default) or "relu" (the paper's hinge).
        reduction: "mean" over B*C*H*W, "sum", or "none" for the (B, C, H, W) loss map.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (reference).

    Returns:
        A 0-dim tensor, or the loss map for reduction="none"; dtype of ``u``.
    """
    check_image(u, "u")
    margin = check_real(margin, "margin")
    beta = check_real(beta, "beta", min_value=0.0, min_inclusive=False)
    eps = check_real(eps, "eps", min_value=0.0)
    grad_threshold = check_real(grad_threshold, "grad_threshold", min_value=0.0)
    check_choice(activation, "activation", QC2_ACTIVATIONS)
    check_choice(reduction, "reduction", REDUCTIONS)
    be = resolve("qc2_loss", backend, u)
    args = (margin, beta, eps, grad_threshold, activation, reduction)
    if be == "torch":
        return _ref.qc2_loss(u, *args)
    if be == "triton":
        from geokernels.triton import qc_loss as _triton_qc

        return _triton_qc.qc2_loss_forward(u, *args)
    return torch.ops.geokernels.qc2_loss_forward(u, *args)


def _qc2_forward_fake(u, margin, beta, eps, grad_threshold, activation, reduction):
    if reduction == "none":
        return torch.empty_like(u, memory_format=torch.contiguous_format)
    return u.new_empty(())


def _qc2_backward_fake(grad, u, margin, beta, eps, grad_threshold, activation, reduction):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _qc2_setup_context(ctx, inputs, output):
    u = inputs[0]
    ctx.save_for_backward(u)
    ctx.args = inputs[1:]


def _qc2_backward(ctx, grad):
    (u,) = ctx.saved_tensors
    grad_u = torch.ops.geokernels.qc2_loss_backward(grad, u, *ctx.args)
    return (grad_u,) + (None,) * len(ctx.args)


if _extension.compiled():
    _extension.require_ops("qc2_loss_forward", "qc2_loss_backward")
    torch.library.register_fake("geokernels::qc2_loss_forward")(_qc2_forward_fake)
    torch.library.register_fake("geokernels::qc2_loss_backward")(_qc2_backward_fake)
    torch.library.register_autograd(
        "geokernels::qc2_loss_forward", _qc2_backward, setup_context=_qc2_setup_context)
