"""Triton kernels of the quasi-concavity losses (SPEC.md 1.2), wrapped as torch.library custom ops.

Forward: one program per 2-D tile, stencil reads with indices clamped at 0 (replicate padding
equals the SPEC's "prepend" differences), per-tile partial sums reduced in a fixed order.
Backward: single pass; each output pixel re-evaluates the per-pixel partials at the six
positions its adjoint stencil touches (recompute instead of an intermediate buffer).
Runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 16
BLOCK_W = 64


@triton.jit
def _ld(u_ptr, i, j, W, valid):
    # indices clamped at 0 from above/left (replicate padding); callers keep i < H, j < W
    return tl.load(u_ptr + tl.maximum(i, 0) * W + tl.maximum(j, 0), mask=valid, other=0.0)


@triton.jit
def _stencil(u_ptr, i, j, W, valid, CDT: tl.constexpr):
    c = _ld(u_ptr, i, j, W, valid).to(CDT)
    l = _ld(u_ptr, i, j - 1, W, valid).to(CDT)
    ll = _ld(u_ptr, i, j - 2, W, valid).to(CDT)
    t = _ld(u_ptr, i - 1, j, W, valid).to(CDT)
    tt = _ld(u_ptr, i - 2, j, W, valid).to(CDT)
    tlft = _ld(u_ptr, i - 1, j - 1, W, valid).to(CDT)
    ux = c - l
    uy = c - t
    uxx = ux - (l - ll)
    uyy = uy - (t - tt)
    uxy = ux - (t - tlft)
    uyx = uy - (l - tlft)
    m = (uxy + uyx) * 0.5
    return ux, uy, uxx, uyy, m


@triton.jit
def _log1p_nonneg(z):
    # accurate log1p for z >= 0 without libdevice (Goldberg's correction)
    w = 1.0 + z
    return tl.where(w == 1.0, z, tl.log(w) * z / (w - 1.0))


@triton.jit
def _core(ux, uy, uxx, uyy, m, margin, eps, thr):
    s = ux * ux + uy * uy + eps
    pos = s > 0.0
    g = tl.where(pos, tl.sqrt(tl.where(pos, s, 1.0)), 0.0)
    msk = g > thr
    gs = tl.where(msk, g, 1.0)
    t1 = (0.0 - uy) / gs
    t2 = ux / gs
    q = t1 * t1 * uxx + 2.0 * t1 * t2 * m + t2 * t2 * uyy
    x = tl.where(msk, q + margin, 0.0)
    return g, gs, t1, t2, x, pos, msk


@triton.jit
def _activation(x, beta, RELU: tl.constexpr):
    if RELU:
        phi = tl.where(x > 0.0, x, 0.0)
        dphi = tl.where(x > 0.0, 1.0, 0.0)
    else:
        bx = x * beta
        z = tl.exp(tl.minimum(bx, 20.0))  # the linear branch takes over above 20: no overflow
        lin = bx > 20.0
        phi = tl.where(lin, x, _log1p_nonneg(z) / beta)
        dphi = tl.where(lin, 1.0, z / (z + 1.0))
    return phi, dphi


@triton.jit
def _tile_coords(pid, H, W, BH: tl.constexpr, BW: tl.constexpr):
    tiles_w = tl.cdiv(W, BW)
    tiles_h = tl.cdiv(H, BH)
    plane = pid // (tiles_w * tiles_h)
    rem = pid % (tiles_w * tiles_h)
    i = (rem // tiles_w) * BH + tl.arange(0, BH)[:, None]
    j = (rem % tiles_w) * BW + tl.arange(0, BW)[None, :]
    return plane, i, j


@triton.jit
def _qc2_fwd_kernel(u_ptr, map_ptr, part_ptr, H, W, margin, beta, eps, thr,
                    RELU: tl.constexpr, WRITE_MAP: tl.constexpr, CDT: tl.constexpr,
                    BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = _tile_coords(pid, H, W, BH, BW)
    base = u_ptr + plane.to(tl.int64) * H * W
    valid = (i < H) & (j < W)
    ux, uy, uxx, uyy, m = _stencil(base, i, j, W, valid, CDT)
    g, gs, t1, t2, x, pos, msk = _core(ux, uy, uxx, uyy, m, margin, eps, thr)
    phi, dphi = _activation(x, beta, RELU)
    v = phi * g
    if WRITE_MAP:
        tl.store(map_ptr + plane.to(tl.int64) * H * W + i * W + j, v.to(map_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(part_ptr + pid, tl.sum(tl.sum(tl.where(valid, v, 0.0).to(tl.float64), axis=1), axis=0))


@triton.jit
def _partials(u_ptr, g_ptr, i, j, H, W, w_scalar, margin, beta, eps, thr,
              RELU: tl.constexpr, GRAD_MAP: tl.constexpr, CDT: tl.constexpr):
    """(a_x, a_y, a_xx, a_yy, a_m/2) of w*l at (i, j); zero outside the image."""
    inside = (i < H) & (j < W)
    ux, uy, uxx, uyy, m = _stencil(u_ptr, i, j, W, inside, CDT)
    g, gs, t1, t2, x, pos, msk = _core(ux, uy, uxx, uyy, m, margin, eps, thr)
    phi, dphi = _activation(x, beta, RELU)
    if GRAD_MAP:
        w = tl.load(g_ptr + i * W + j, mask=inside, other=0.0).to(CDT)
    else:
        w = w_scalar
    a = tl.where(msk, w * g * dphi, 0.0)
    grad_g = w * phi
    axx = a * t1 * t1
    ayy = a * t2 * t2
    am = a * 2.0 * t1 * t2
    gt1 = a * (2.0 * t1 * uxx + 2.0 * t2 * m)
    gt2 = a * (2.0 * t2 * uyy + 2.0 * t1 * m)
    inv_g = 1.0 / gs
    grad_g = grad_g + tl.where(msk, (gt1 * uy - gt2 * ux) * inv_g * inv_g, 0.0)
    dg = tl.where(pos, grad_g / tl.where(pos, g, 1.0), 0.0)
    ax = gt2 * inv_g + dg * ux
    ay = (0.0 - gt1) * inv_g + dg * uy
    z = 0.0
    return (tl.where(inside, ax, z), tl.where(inside, ay, z), tl.where(inside, axx, z),
            tl.where(inside, ayy, z), tl.where(inside, am * 0.5, z))


@triton.jit
def _qc2_bwd_kernel(u_ptr, g_ptr, out_ptr, H, W, grad_divisor, margin, beta, eps, thr,
                    RELU: tl.constexpr, GRAD_MAP: tl.constexpr, CDT: tl.constexpr,
                    BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = _tile_coords(pid, H, W, BH, BW)
    off = plane.to(tl.int64) * H * W
    ub = u_ptr + off
    if GRAD_MAP:
        gb = g_ptr + off
        w_scalar = 0.0
    else:  # reduced loss: the upstream gradient is one scalar on the device (no host sync)
        gb = g_ptr
        w_scalar = tl.load(g_ptr).to(CDT) / grad_divisor
    # the six positions the adjoint stencil of (i, j) touches
    ax00, ay00, axx00, ayy00, am00 = _partials(ub, gb, i, j, H, W, w_scalar, margin, beta, eps, thr, RELU, GRAD_MAP, CDT)
    ax01, ay01, axx01, ayy01, am01 = _partials(ub, gb, i, j + 1, H, W, w_scalar, margin, beta, eps, thr, RELU, GRAD_MAP, CDT)
    ax02, ay02, axx02, ayy02, am02 = _partials(ub, gb, i, j + 2, H, W, w_scalar, margin, beta, eps, thr, RELU, GRAD_MAP, CDT)
    ax10, ay10, axx10, ayy10, am10 = _partials(ub, gb, i + 1, j, H, W, w_scalar, margin, beta, eps, thr, RELU, GRAD_MAP, CDT)
    ax11, ay11, axx11, ayy11, am11 = _partials(ub, gb, i + 1, j + 1, H, W, w_scalar, margin, beta, eps, thr, RELU, GRAD_MAP, CDT)
    ax20, ay20, axx20, ayy20, am20 = _partials(ub, gb, i + 2, j, H, W, w_scalar, margin, beta, eps, thr, RELU, GRAD_MAP, CDT)
    top = i >= 1
    zero = 0.0
    # GUX(i, j) and GUX(i, j+1): zero at column 0 (Dx^T drops it) and off-image
    gux0 = ax00 + axx00 - axx01 + tl.where(top, am00, zero) - am10
    gux0 = tl.where((j >= 1) & (i < H) & (j < W), gux0, zero)
    gux1 = ax01 + axx01 - axx02 + tl.where(top, am01, zero) - am11
    gux1 = tl.where((i < H) & (j + 1 < W), gux1, zero)
    # GUY(i, j) and GUY(i+1, j): zero at row 0 (Dy^T drops it) and off-image
    guy0 = ay00 + ayy00 - ayy10 + tl.where(j >= 1, am00, zero) - am01
    guy0 = tl.where(top & (i < H) & (j < W), guy0, zero)
    guy1 = ay10 + ayy10 - ayy20 + tl.where(j >= 1, am10, zero) - am11
    guy1 = tl.where((i + 1 < H) & (j < W), guy1, zero)
    grad = gux0 - gux1 + guy0 - guy1
    valid = (i < H) & (j < W)
    tl.store(out_ptr + off + i * W + j, grad.to(out_ptr.dtype.element_ty), mask=valid)


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(u: torch.Tensor):
    B, C, H, W = u.shape
    return (B * C * triton.cdiv(H, BLOCK_H) * triton.cdiv(W, BLOCK_W),)


@torch.library.custom_op("geokernels_triton::qc2_loss_forward", mutates_args=())
def qc2_loss_forward(u: torch.Tensor, margin: float, beta: float, eps: float,
                     grad_threshold: float, activation: str, reduction: str) -> torch.Tensor:
    u = u.contiguous()
    H, W = u.shape[-2:]
    grid = _grid(u)
    relu = activation == "relu"
    if reduction == "none":
        out = torch.empty_like(u)
        _qc2_fwd_kernel[grid](u, out, out, H, W, margin, beta, eps, grad_threshold,
                              RELU=relu, WRITE_MAP=True, CDT=_compute_dtype(u.dtype),
                              BH=BLOCK_H, BW=BLOCK_W)
        return out
    partials = torch.empty(grid[0], dtype=torch.float64, device=u.device)
    _qc2_fwd_kernel[grid](u, u, partials, H, W, margin, beta, eps, grad_threshold,
                          RELU=relu, WRITE_MAP=False, CDT=_compute_dtype(u.dtype),
                          BH=BLOCK_H, BW=BLOCK_W)
    total = partials.sum()
    if reduction == "mean":
        total = total / u.numel()
    return total.to(u.dtype)


@qc2_loss_forward.register_fake
def _(u, margin, beta, eps, grad_threshold, activation, reduction):
    if reduction == "none":
        return torch.empty_like(u, memory_format=torch.contiguous_format)
    return u.new_empty(())


@torch.library.custom_op("geokernels_triton::qc2_loss_backward", mutates_args=())
def qc2_loss_backward(grad: torch.Tensor, u: torch.Tensor, margin: float, beta: float, eps: float,
                      grad_threshold: float, activation: str, reduction: str) -> torch.Tensor:
    u = u.contiguous()
    H, W = u.shape[-2:]
    out = torch.empty_like(u)
    g = grad.to(u.dtype).contiguous()
    divisor = float(u.numel()) if reduction == "mean" else 1.0
    _qc2_bwd_kernel[_grid(u)](u, g, out, H, W, divisor, margin, beta, eps, grad_threshold,
                              RELU=activation == "relu", GRAD_MAP=reduction == "none",
                              CDT=_compute_dtype(u.dtype), BH=BLOCK_H, BW=BLOCK_W)
    return out


@qc2_loss_backward.register_fake
def _(grad, u, margin, beta, eps, grad_threshold, activation, reduction):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _backward(ctx, grad):
    (u,) = ctx.saved_tensors
    return (qc2_loss_backward(grad, u, *ctx.args),) + (None,) * len(ctx.args)


qc2_loss_forward.register_autograd(_backward, setup_context=_setup_context)
