"""Triton kernels of the contour-flow shape loss (SPEC.md 2.3), as torch.library custom ops.

Forward: one program per 2-D tile of one (b, c) plane; |c| per pixel from sigmoid at the pixel and
its bottom/right neighbours (zero padding), per-tile partial sums reduced in a fixed order.
Backward: single pass; each pixel recomputes the per-pixel partials at itself and at its top and
left neighbours (the adjoint stencil of grad+) instead of staging them in memory.
Math and gradient semantics as csrc/include/geokernels/contour_flow_math.h (cosine_similarity's).
Runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from geokernels.ops._validate import refuse_double_backward
from geokernels.triton._tiles import (compute_dtype, device_guard, scalar_args, sqrt_ieee, tile_coords,
                                      tile_grid)

BLOCK_H = 16
BLOCK_W = 32


@triton.jit
def _sig(x_ptr, i, j, H, W, CDT: tl.constexpr):
    inside = (i >= 0) & (i < H) & (j >= 0) & (j < W)
    x = tl.load(x_ptr + i * W + j, mask=inside, other=0.0).to(CDT)
    return tl.where(inside, 1.0 / (1.0 + tl.exp(0.0 - x)), 0.0)


@triton.jit
def _pixel(x_ptr, f0_ptr, f1_ptr, i, j, H, W, eps, CDT: tl.constexpr):
    """a = grad+ u, f and the pieces of |c| at (i, j); zero outside the image. Each vector is
    scaled by its clamped norm first, as contour_flow_math.h (A F underflows in float32)."""
    inside = (i >= 0) & (i < H) & (j >= 0) & (j < W)
    u = _sig(x_ptr, i, j, H, W, CDT)
    a0 = _sig(x_ptr, i + 1, j, H, W, CDT) - u
    a1 = _sig(x_ptr, i, j + 1, H, W, CDT) - u
    a0 = tl.where(inside, a0, 0.0)
    a1 = tl.where(inside, a1, 0.0)
    f0 = tl.load(f0_ptr + i * W + j, mask=inside, other=0.0).to(CDT)
    f1 = tl.load(f1_ptr + i * W + j, mask=inside, other=0.0).to(CDT)
    na = sqrt_ieee(a0 * a0 + a1 * a1)   # not tl.sqrt: fp32 flushes a subnormal |a|^2 to 0
    nf = sqrt_ieee(f0 * f0 + f1 * f1)
    iA = 1.0 / tl.maximum(na, eps)
    iF = 1.0 / tl.maximum(nf, eps)
    c = (a0 * iA) * (f0 * iF) + (a1 * iA) * (f1 * iF)
    return a0, a1, f0, f1, na, nf, iA, iF, c


@triton.jit
def _grads(x_ptr, f0_ptr, f1_ptr, g_ptr, i, j, H, W, eps, w_scalar, GRAD_MAP: tl.constexpr,
           CDT: tl.constexpr):
    inside = (i >= 0) & (i < H) & (j >= 0) & (j < W)
    a0, a1, f0, f1, na, nf, iA, iF, c = _pixel(x_ptr, f0_ptr, f1_ptr, i, j, H, W, eps, CDT)
    if GRAD_MAP:
        w = tl.load(g_ptr + i * W + j, mask=inside, other=0.0).to(CDT)
    else:
        w = w_scalar
    s = tl.where(c > 0.0, w, tl.where(c < 0.0, 0.0 - w, 0.0))
    # dc/da = (f/F)/A - (c/A)(a/|a|), dc/df = (a/A)/F - (c/F)(f/|f|), as contour_flow_math.h
    ra = tl.where(na > 0.0, 1.0 / tl.where(na > 0.0, na, 1.0), 0.0)
    rf = tl.where(nf > 0.0, 1.0 / tl.where(nf > 0.0, nf, 1.0), 0.0)
    sa = s * iA
    sf = s * iF
    ka = sa * c
    kf = sf * c
    ga0 = tl.where(inside, sa * (f0 * iF) - ka * (a0 * ra), 0.0)
    ga1 = tl.where(inside, sa * (f1 * iF) - ka * (a1 * ra), 0.0)
    gf0 = sf * (a0 * iA) - kf * (f0 * rf)
    gf1 = sf * (a1 * iA) - kf * (f1 * rf)
    return ga0, ga1, gf0, gf1


@triton.jit
def _cfl_fwd_kernel(x_ptr, f_ptr, map_ptr, part_ptr, H, W, prm_ptr, WRITE_MAP: tl.constexpr,
                    CDT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    eps = tl.load(prm_ptr + 0)  # a tensor: a Python float argument would arrive as float32
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    hw = H * W
    xb = x_ptr + plane * hw
    f0b = f_ptr + 2 * plane * hw
    f1b = f0b + hw
    valid = (i < H) & (j < W)
    a0, a1, f0, f1, na, nf, iA, iF, c = _pixel(xb, f0b, f1b, i, j, H, W, eps, CDT)
    v = tl.where(valid, tl.abs(c), 0.0)
    if WRITE_MAP:
        tl.store(map_ptr + plane * hw + i * W + j, v.to(map_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(part_ptr + pid, tl.sum(tl.sum(v.to(tl.float64), axis=1), axis=0))


@triton.jit
def _cfl_bwd_kernel(x_ptr, f_ptr, g_ptr, gx_ptr, gf_ptr, H, W, prm_ptr,
                    GRAD_MAP: tl.constexpr, CDT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    eps = tl.load(prm_ptr + 0)  # scalar_args(x, [eps, divisor]), in the compute dtype
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    hw = H * W
    xb = x_ptr + plane * hw
    f0b = f_ptr + 2 * plane * hw
    f1b = f0b + hw
    if GRAD_MAP:
        gb = g_ptr + plane * hw
        w_scalar = 0.0
    else:  # reduced loss: the upstream gradient is one scalar on the device (no host sync)
        gb = g_ptr
        w_scalar = tl.load(g_ptr).to(CDT) / tl.load(prm_ptr + 1)
    ga0, ga1, gf0, gf1 = _grads(xb, f0b, f1b, gb, i, j, H, W, eps, w_scalar, GRAD_MAP, CDT)
    ga0_up, _a, _b, _c = _grads(xb, f0b, f1b, gb, i - 1, j, H, W, eps, w_scalar, GRAD_MAP, CDT)
    _d, ga1_left, _e, _f = _grads(xb, f0b, f1b, gb, i, j - 1, H, W, eps, w_scalar, GRAD_MAP, CDT)
    u = _sig(xb, i, j, H, W, CDT)
    gu = (ga0_up - ga0) + (ga1_left - ga1)
    valid = (i < H) & (j < W)
    off = i * W + j
    tl.store(gx_ptr + plane * hw + off, (gu * u * (1.0 - u)).to(gx_ptr.dtype.element_ty), mask=valid)
    tl.store(gf_ptr + 2 * plane * hw + off, gf0.to(gf_ptr.dtype.element_ty), mask=valid)
    tl.store(gf_ptr + (2 * plane + 1) * hw + off, gf1.to(gf_ptr.dtype.element_ty), mask=valid)


@torch.library.custom_op("geokernels_triton::contour_flow_loss_forward", mutates_args=())
def contour_flow_loss_forward(logits: torch.Tensor, flow: torch.Tensor, eps: float,
                              reduction: str) -> torch.Tensor:
    x = logits.contiguous()
    f = flow.to(x.dtype).contiguous()
    H, W = x.shape[-2:]
    grid = tile_grid(x, BLOCK_H, BLOCK_W)
    # eps in the compute dtype, not x's: 1e-8 is 0 in float16 (then |grad u| = 0 gives NaN)
    prm = scalar_args(x, [eps])
    if reduction == "none":
        out = torch.empty_like(x)
        with device_guard(x):
            _cfl_fwd_kernel[grid](x, f, out, out, H, W, prm, WRITE_MAP=True,
                                  CDT=compute_dtype(x.dtype), BH=BLOCK_H, BW=BLOCK_W)
        return out
    partials = torch.empty(grid[0], dtype=torch.float64, device=x.device)
    with device_guard(x):
        _cfl_fwd_kernel[grid](x, f, partials, partials, H, W, prm, WRITE_MAP=False,
                              CDT=compute_dtype(x.dtype), BH=BLOCK_H, BW=BLOCK_W)
    total = partials.sum()
    if reduction == "mean":
        total = total / x.numel()
    return total.to(x.dtype)


@contour_flow_loss_forward.register_fake
def _(logits, flow, eps, reduction):
    if reduction == "none":
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    return logits.new_empty(())


@torch.library.custom_op("geokernels_triton::contour_flow_loss_backward", mutates_args=())
def contour_flow_loss_backward(grad: torch.Tensor, logits: torch.Tensor, flow: torch.Tensor,
                               eps: float, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.contiguous()
    f = flow.to(x.dtype).contiguous()
    H, W = x.shape[-2:]
    gx = torch.empty_like(x)
    gf = torch.empty_like(f)
    g = grad.to(x.dtype).contiguous()
    divisor = float(x.numel()) if reduction == "mean" else 1.0
    grid = tile_grid(x, BLOCK_H, BLOCK_W)
    prm = scalar_args(x, [eps, divisor])  # compute dtype: see the forward
    with device_guard(x):
        _cfl_bwd_kernel[grid](x, f, g, gx, gf, H, W, prm, GRAD_MAP=reduction == "none",
                              CDT=compute_dtype(x.dtype), BH=BLOCK_H, BW=BLOCK_W)
    return gx, gf.to(flow.dtype)


@contour_flow_loss_backward.register_fake
def _(grad, logits, flow, eps, reduction):
    return (torch.empty_like(logits, memory_format=torch.contiguous_format),
            torch.empty_like(flow, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.args = inputs[2:]


def _backward(ctx, grad):
    refuse_double_backward("contour_flow_loss")
    logits, flow = ctx.saved_tensors
    gx, gf = contour_flow_loss_backward(grad, logits, flow, *ctx.args)
    return gx, gf, None, None


contour_flow_loss_forward.register_autograd(_backward, setup_context=_setup_context)
