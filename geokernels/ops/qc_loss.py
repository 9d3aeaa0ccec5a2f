"""Quasi-concavity (D-Convexity) losses: public API, fake kernels and autograd (SPEC.md 1.2-1.4).

The C++/CUDA kernels are ``torch.ops.geokernels.qc{2,1}_loss_forward/backward``; the backward is
closed form (no autograd graph through the stencils).
"""
from __future__ import annotations

import torch

from geokernels import _extension
from geokernels._backend import register_op, resolve
from geokernels.ops._autocast import float32_under_autocast
from geokernels.ops._validate import (REDUCTIONS, check_choice, check_image, check_int, check_real,
                                      refuse_double_backward)
from geokernels.reference import dconvex as _ref

QC2_ACTIVATIONS = ("softplus", "relu")


register_op("qc2_loss", ("cpu", "cuda", "triton"))


@float32_under_autocast
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
    refuse_double_backward("qc2_loss")
    (u,) = ctx.saved_tensors
    grad_u = torch.ops.geokernels.qc2_loss_backward(grad, u, *ctx.args)
    return (grad_u,) + (None,) * len(ctx.args)


if _extension.compiled():
    _extension.require_ops("qc2_loss_forward", "qc2_loss_backward")
    torch.library.register_fake("geokernels::qc2_loss_forward")(_qc2_forward_fake)
    torch.library.register_fake("geokernels::qc2_loss_backward")(_qc2_backward_fake)
    torch.library.register_autograd(
        "geokernels::qc2_loss_forward", _qc2_backward, setup_context=_qc2_setup_context)


# ---- SPEC 1.3: first-order quasi-concavity loss ---------------------------------------------

QC1_MAX_WINDOW = 63  # the kernels' limit (csrc/include/geokernels/dconvex_args.h)

register_op("qc1_loss", ("cpu", "cuda", "triton"))


def check_window(window) -> int:
    """``window`` must be an odd int in [1, QC1_MAX_WINDOW]."""
    window = check_int(window, "window", min_value=1)
    if window % 2 == 0:
        raise ValueError(f"window must be odd, got {window}")
    if window > QC1_MAX_WINDOW:
        raise ValueError(f"window must be <= {QC1_MAX_WINDOW}, got {window}")
    return window


@float32_under_autocast
def qc1_loss(
    u: torch.Tensor,
    window: int = 7,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """First-order quasi-concavity loss of a mask function (SPEC.md 1.3).

    For every pixel p and offset d in the ``window`` x ``window`` square (centre included),
    ``w_d * h_d`` with ``w_d = sigmoid(u(p+d) - u(p))`` (u = 0 outside the image) and
    ``h_d = relu(-(uy n_dy + ux n_dx))``, n_d = d / (|d| + 1e-8), ux/uy the backward
    differences of SPEC 1.1. The fused kernels never store the window**2 maps: memory is
    O(B*C*H*W) forward and backward.

    Args:
        u: (B, C, H, W) mask values, float32/float64 (float16/bfloat16 on CUDA, computed in
            float32). Channels are independent.
        window: odd side of the offset square, 1 <= window <= 63.
        reduction: "mean" over B*C*K*H*W with K = window**2 (the centre offset counts),
            "sum", or "none" for the (B, C, H, W) map of per-pixel sums over the offsets.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (reference).

    Returns:
        A 0-dim tensor, or the loss map for reduction="none"; dtype of ``u``.
    """
    check_image(u, "u")
    window = check_window(window)
    check_choice(reduction, "reduction", REDUCTIONS)
    be = resolve("qc1_loss", backend, u)
    if be == "torch":
        return _ref.qc1_loss(u, window, reduction)
    if be == "triton":
        from geokernels.triton import qc_loss as _triton_qc

        return _triton_qc.qc1_loss_forward(u, window, reduction)
    if be == "cpu" and reduction != "none" and torch.is_grad_enabled() and u.requires_grad:
        # the gradient pass evaluates every sigmoid the forward needs: compute the loss and
        # its gradient together (one pass instead of two); backward is then a scale
        return torch.ops.geokernels.qc1_loss_value_and_grad(u, window, reduction)[0]
    return torch.ops.geokernels.qc1_loss_forward(u, window, reduction)


def _qc1_forward_fake(u, window, reduction):
    if reduction == "none":
        return torch.empty_like(u, memory_format=torch.contiguous_format)
    return u.new_empty(())


def _qc1_backward_fake(grad, u, window, reduction):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _qc1_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _qc1_backward(ctx, grad):
    refuse_double_backward("qc1_loss")
    (u,) = ctx.saved_tensors
    grad_u = torch.ops.geokernels.qc1_loss_backward(grad, u, *ctx.args)
    return (grad_u,) + (None,) * len(ctx.args)


def _qc1_value_and_grad_fake(u, window, reduction):
    return u.new_empty(()), torch.empty_like(u, memory_format=torch.contiguous_format)


def _qc1_value_and_grad_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _qc1_value_and_grad_backward(ctx, grad_loss, _grad_of_grad):
    refuse_double_backward("qc1_loss")
    (grad_u,) = ctx.saved_tensors
    return grad_loss * grad_u, None, None


if _extension.compiled():
    _extension.require_ops("qc1_loss_forward", "qc1_loss_backward", "qc1_loss_value_and_grad")
    torch.library.register_fake("geokernels::qc1_loss_value_and_grad")(_qc1_value_and_grad_fake)
    torch.library.register_autograd(
        "geokernels::qc1_loss_value_and_grad", _qc1_value_and_grad_backward,
        setup_context=_qc1_value_and_grad_setup_context)
    torch.library.register_fake("geokernels::qc1_loss_forward")(_qc1_forward_fake)
    torch.library.register_fake("geokernels::qc1_loss_backward")(_qc1_backward_fake)
    torch.library.register_autograd(
        "geokernels::qc1_loss_forward", _qc1_backward, setup_context=_qc1_setup_context)


# ---- SPEC 1.4: fidelity ------------------------------------------------------------------------

@float32_under_autocast
def fidelity_loss(u: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
    """One-sided fidelity ``mean(relu(u0 - u)**2)`` (SPEC.md 1.4): only u < u0 is penalised,
    since convexification only raises u.

    A pointwise loss that PyTorch already fuses well, so it is the reference's torch expression
    after validation, except that the mean is summed in fixed blocks: ATen's CPU ``mean`` splits
    its reduction by thread count above 32768 elements, so its last bit depended on
    ``torch.get_num_threads()``; here it does not (values equal the reference's up to summation
    order, gradients to u and u0 identical). CGPM's fused kernels evaluate its closed-form
    gradient themselves.

    Args:
        u: (B, C, H, W) current mask values.
        u0: (B, C, H, W) reference mask, same shape, dtype and device as ``u``.

    Returns:
        A 0-dim tensor of the dtype of ``u``.
    """
    check_image(u, "u")
    check_image(u0, "u0")
    if u0.shape != u.shape:
        raise ValueError(f"u0 must have the shape of u {tuple(u.shape)}, got {tuple(u0.shape)}")
    if u0.dtype != u.dtype:
        raise TypeError(f"u0 must have the dtype of u ({u.dtype}), got {u0.dtype}")
    if u0.device != u.device:
        raise ValueError(f"u0 must be on the device of u ({u.device}), got {u0.device}")
    return _fixed_order_sum(torch.relu(u0 - u).pow(2).reshape(-1)) / u.numel()


_SUM_BLOCK = 4096   # below ATen's 32768-element grain: each block is summed serially


def _fixed_order_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor whose rounding does not depend on the thread count: zero-padded
    rows of _SUM_BLOCK elements, each row summed on its own (a row reduction splits over rows,
    never inside one), then the row sums the same way. Differentiable."""
    while x.numel() > _SUM_BLOCK:
        pad = -x.numel() % _SUM_BLOCK
        x = torch.nn.functional.pad(x, (0, pad)).view(-1, _SUM_BLOCK).sum(dim=1)
    return x.sum()
