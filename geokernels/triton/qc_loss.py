"""Triton kernels of the quasi-concavity losses (SPEC.md 1.2), wrapped as torch.library custom ops.

Forward: one program per 2-D tile, stencil reads with indices clamped at 0 (replicate padding
equals the SPEC's "prepend" differences), per-tile partial sums reduced in a fixed order.
Backward: single pass; each output pixel re-evaluates the per-pixel partials at the six
positions its adjoint stencil touches (recompute instead of an intermediate buffer).
Float parameters (margin, beta, eps, grad_threshold, the mean divisor) reach the kernels as a
small device tensor in the compute dtype: compiled Triton passes a Python float argument as
float32 (the interpreter keeps the double), which would round float64 constants.
Runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from geokernels.ops._validate import refuse_double_backward
from geokernels.triton._tiles import (compute_dtype, compute_torch_dtype, device_guard, scalar_args,
                                      sqrt_ieee, tile_coords, tile_grid)

BLOCK_H = 16
BLOCK_W = 64
# the qc2 backward recomputes the partials at six positions per pixel: 16x64 tiles on 4 warps
# (8 pixels per thread) spilled 2.6 KB (fp32) and 20 KB (fp64) per thread on sm_90 (ptxas -v);
# 16x16 on 8 warps (one pixel per thread) needs 118 / 186 registers and spills nothing
QC2_BWD_BLOCK = (16, 16)
QC2_BWD_WARPS = 8


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
    g = tl.where(pos, sqrt_ieee(tl.where(pos, s, 1.0)), 0.0)
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
def _qc2_params(prm_ptr):
    """margin, beta, eps, grad_threshold from scalar_args(u, [margin, beta, eps, grad_threshold,
    ...]) (float parameters come as a tensor: compiled Triton would pass floats as fp32)."""
    return tl.load(prm_ptr + 0), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2), tl.load(prm_ptr + 3)


@triton.jit
def _qc2_fwd_kernel(u_ptr, map_ptr, part_ptr, H, W, prm_ptr,
                    RELU: tl.constexpr, WRITE_MAP: tl.constexpr, CDT: tl.constexpr,
                    BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    margin, beta, eps, thr = _qc2_params(prm_ptr)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    base = u_ptr + plane * H * W
    valid = (i < H) & (j < W)
    ux, uy, uxx, uyy, m = _stencil(base, i, j, W, valid, CDT)
    g, gs, t1, t2, x, pos, msk = _core(ux, uy, uxx, uyy, m, margin, eps, thr)
    phi, dphi = _activation(x, beta, RELU)
    v = phi * g
    if WRITE_MAP:
        tl.store(map_ptr + plane * H * W + i * W + j, v.to(map_ptr.dtype.element_ty), mask=valid)
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
    # (gt1 uy - gt2 ux) / g^2 in the unit-vector form of qc2_math.h (no |u|^3 overflow)
    grad_g = grad_g + tl.where(msk, (0.0 - (gt1 * t1 + gt2 * t2)) * inv_g, 0.0)
    dg = tl.where(pos, grad_g / tl.where(pos, g, 1.0), 0.0)
    ax = gt2 * inv_g + dg * ux
    ay = (0.0 - gt1) * inv_g + dg * uy
    z = 0.0
    return (tl.where(inside, ax, z), tl.where(inside, ay, z), tl.where(inside, axx, z),
            tl.where(inside, ayy, z), tl.where(inside, am * 0.5, z))


@triton.jit
def _qc2_grad_tile(ub, gb, i, j, H, W, w_scalar, margin, beta, eps, thr,
                   RELU: tl.constexpr, GRAD_MAP: tl.constexpr, CDT: tl.constexpr):
    """grad u at (i, j) of sum_q w_q l_q (qc2); shared by the loss backward and CGPM's step."""
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
    return gux0 - gux1 + guy0 - guy1


@triton.jit
def _qc2_bwd_kernel(u_ptr, g_ptr, out_ptr, H, W, prm_ptr,
                    RELU: tl.constexpr, GRAD_MAP: tl.constexpr, CDT: tl.constexpr,
                    BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    margin, beta, eps, thr = _qc2_params(prm_ptr)  # [4] is the mean divisor
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    off = plane * H * W
    ub = u_ptr + off
    if GRAD_MAP:
        gb = g_ptr + off
        w_scalar = 0.0
    else:  # reduced loss: the upstream gradient is one scalar on the device (no host sync)
        gb = g_ptr
        w_scalar = tl.load(g_ptr).to(CDT) / tl.load(prm_ptr + 4)
    grad = _qc2_grad_tile(ub, gb, i, j, H, W, w_scalar, margin, beta, eps, thr, RELU, GRAD_MAP, CDT)
    valid = (i < H) & (j < W)
    tl.store(out_ptr + off + i * W + j, grad.to(out_ptr.dtype.element_ty), mask=valid)


@torch.library.custom_op("geokernels_triton::qc2_loss_forward", mutates_args=())
def qc2_loss_forward(u: torch.Tensor, margin: float, beta: float, eps: float,
                     grad_threshold: float, activation: str, reduction: str) -> torch.Tensor:
    u = u.contiguous()
    H, W = u.shape[-2:]
    grid = tile_grid(u, BLOCK_H, BLOCK_W)
    relu = activation == "relu"
    prm = scalar_args(u, [margin, beta, eps, grad_threshold])
    if reduction == "none":
        out = torch.empty_like(u)
        with device_guard(u):
            _qc2_fwd_kernel[grid](u, out, out, H, W, prm, RELU=relu, WRITE_MAP=True,
                                  CDT=compute_dtype(u.dtype), BH=BLOCK_H, BW=BLOCK_W)
        return out
    partials = torch.empty(grid[0], dtype=torch.float64, device=u.device)
    with device_guard(u):
        _qc2_fwd_kernel[grid](u, u, partials, H, W, prm, RELU=relu, WRITE_MAP=False,
                              CDT=compute_dtype(u.dtype), BH=BLOCK_H, BW=BLOCK_W)
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
    prm = scalar_args(u, [margin, beta, eps, grad_threshold, divisor])
    bh, bw = QC2_BWD_BLOCK
    grid = tile_grid(u, bh, bw)
    with device_guard(u):
        _qc2_bwd_kernel[grid](u, g, out, H, W, prm, RELU=activation == "relu",
                              GRAD_MAP=reduction == "none", CDT=compute_dtype(u.dtype),
                              BH=bh, BW=bw, num_warps=QC2_BWD_WARPS)
    return out


@qc2_loss_backward.register_fake
def _(grad, u, margin, beta, eps, grad_threshold, activation, reduction):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _backward(ctx, grad):
    refuse_double_backward("qc2_loss")
    (u,) = ctx.saved_tensors
    return (qc2_loss_backward(grad, u, *ctx.args),) + (None,) * len(ctx.args)


qc2_loss_forward.register_autograd(_backward, setup_context=_setup_context)


# ---- SPEC 1.3: first-order loss (qc1) --------------------------------------------------------
# The offsets walk a small host-built table (dy, dx and the unit direction in the compute dtype,
# exactly as the reference computes it) in a runtime loop. Forward: one sigmoid per pair {d, -d}
# (see csrc/include/geokernels/qc1_math.h). Backward: kernel 1 gathers, per pixel, the
# sigmoid-path term T and the partials AX, AY over all offsets; kernel 2 applies the adjoints
# of the backward differences: grad = T + Dx^T AX + Dy^T AY. Memory O(B*C*H*W).

QC1_BLOCK_H = 16
QC1_BLOCK_W = 32


@triton.jit
def _ld0(u_ptr, i, j, H, W, valid, CDT: tl.constexpr):
    # u outside the image = 0
    inside = valid & (i >= 0) & (i < H) & (j >= 0) & (j < W)
    return tl.load(u_ptr + i * W + j, mask=inside, other=0.0).to(CDT)


@triton.jit
def _qc1_diffs(u_ptr, i, j, H, W, valid, CDT: tl.constexpr):
    """u, ux, uy at (i, j) (SPEC 1.1 prepend differences; all 0 outside the image)."""
    uc = _ld0(u_ptr, i, j, H, W, valid, CDT)
    ux = tl.where(j >= 1, uc - _ld0(u_ptr, i, j - 1, H, W, valid, CDT), 0.0)
    uy = tl.where(i >= 1, uc - _ld0(u_ptr, i - 1, j, H, W, valid, CDT), 0.0)
    return uc, ux, uy


@triton.jit
def _qc1_alignment(ux, uy, nx, ny, EXACT_MUL: tl.constexpr):
    """a_d = uy n_dy + ux n_dx with both products rounded, never fused into an FMA (on GPU the
    compiler would; that moves pixels across relu's kink where the products cancel exactly,
    see csrc/include/geokernels/qc1_math.h). The interpreter (numpy) never fuses."""
    if EXACT_MUL:
        a = libdevice.mul_rn(uy, ny) + libdevice.mul_rn(ux, nx)
    else:
        a = uy * ny + ux * nx
    return a


@triton.jit
def _qc1_fwd_kernel(u_ptr, off_ptr, dir_ptr, map_ptr, part_ptr, H, W, NPAIRS: tl.constexpr,
                    WRITE_MAP: tl.constexpr, CDT: tl.constexpr, EXACT_MUL: tl.constexpr,
                    BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    base = u_ptr + plane * H * W
    valid = (i < H) & (j < W)
    uc, ux, uy = _qc1_diffs(base, i, j, H, W, valid, CDT)
    acc = tl.zeros([BH, BW], dtype=CDT)
    for k in range(NPAIRS):
        dy = tl.load(off_ptr + 2 * k)
        dx = tl.load(off_ptr + 2 * k + 1)
        ny = tl.load(dir_ptr + 2 * k).to(CDT)
        nx = tl.load(dir_ptr + 2 * k + 1).to(CDT)
        a = _qc1_alignment(ux, uy, nx, ny, EXACT_MUL)
        neg = a < 0.0
        u_plus = _ld0(base, i + dy, j + dx, H, W, valid, CDT)
        u_minus = _ld0(base, i - dy, j - dx, H, W, valid, CDT)
        nb = tl.where(neg, u_plus, u_minus)
        mag = tl.where(neg, 0.0 - a, a)
        acc += mag / (1.0 + tl.exp(uc - nb))
    acc = tl.where(valid, acc, 0.0)
    if WRITE_MAP:
        tl.store(map_ptr + plane * H * W + i * W + j, acc.to(map_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(part_ptr + pid, tl.sum(tl.sum(acc.to(tl.float64), axis=1), axis=0))


@triton.jit
def _qc1_bwd_gather_kernel(u_ptr, w_ptr, off_ptr, dir_ptr, t_ptr, ax_ptr, ay_ptr, H, W,
                           NOFF: tl.constexpr, W_MAP: tl.constexpr, CDT: tl.constexpr,
                           EXACT_MUL: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """T, AX, AY of qc1_math.h at every pixel; W(q) = w_ptr map (W_MAP) or the scalar w_ptr[0]."""
    pid = tl.program_id(0)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    off = plane * H * W
    base = u_ptr + off
    valid = (i < H) & (j < W)
    uc, ux, uy = _qc1_diffs(base, i, j, H, W, valid, CDT)
    if W_MAP:
        wb = w_ptr + off
        w_scalar = 0.0
        wc = tl.load(wb + i * W + j, mask=valid, other=0.0).to(CDT)
    else:
        wb = w_ptr
        w_scalar = tl.load(w_ptr).to(CDT)
        wc = tl.where(valid, w_scalar, 0.0)
    t = tl.zeros([BH, BW], dtype=CDT)
    sx = tl.zeros([BH, BW], dtype=CDT)
    sy = tl.zeros([BH, BW], dtype=CDT)
    for k in range(NOFF):
        dy = tl.load(off_ptr + 2 * k)
        dx = tl.load(off_ptr + 2 * k + 1)
        ny = tl.load(dir_ptr + 2 * k).to(CDT)
        nx = tl.load(dir_ptr + 2 * k + 1).to(CDT)
        ii = i + dy
        jj = j + dx
        inside = valid & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
        un, uxn, uyn = _qc1_diffs(base, ii, jj, H, W, inside, CDT)
        if W_MAP:
            wn = tl.load(wb + ii * W + jj, mask=inside, other=0.0).to(CDT)
        else:
            wn = tl.where(inside, w_scalar, 0.0)
        w = 1.0 / (1.0 + tl.exp(uc - un))
        wl = 1.0 / (1.0 + tl.exp(tl.abs(uc - un)))   # sigma'(z) from the side without cancellation
        s = wl * (1.0 - wl)
        a_c = _qc1_alignment(ux, uy, nx, ny, EXACT_MUL)
        a_n = _qc1_alignment(uxn, uyn, nx, ny, EXACT_MUL)
        neg = a_c < 0.0
        h_c = tl.where(neg, 0.0 - a_c, 0.0)
        h_n = tl.maximum(a_n, 0.0)
        t += s * (wn * h_n - wc * h_c)
        sx += tl.where(neg, w * nx, 0.0)
        sy += tl.where(neg, w * ny, 0.0)
    idx = off + i * W + j
    tl.store(t_ptr + idx, t, mask=valid)
    tl.store(ax_ptr + idx, (0.0 - wc) * sx, mask=valid)
    tl.store(ay_ptr + idx, (0.0 - wc) * sy, mask=valid)


@triton.jit
def _qc1_adjoint(t_ptr, ax_ptr, ay_ptr, off, i, j, H, W, valid):
    """T + Dx^T AX + Dy^T AY at (i, j) (buffers in the compute dtype)."""
    base = off + i * W + j
    g = tl.load(t_ptr + base, mask=valid, other=0.0)
    g += tl.load(ax_ptr + base, mask=valid & (j >= 1), other=0.0)
    g -= tl.load(ax_ptr + base + 1, mask=valid & (j + 1 < W), other=0.0)
    g += tl.load(ay_ptr + base, mask=valid & (i >= 1), other=0.0)
    g -= tl.load(ay_ptr + base + W, mask=valid & (i + 1 < H), other=0.0)
    return g


@triton.jit
def _qc1_bwd_finish_kernel(t_ptr, ax_ptr, ay_ptr, out_ptr, H, W, BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    off = plane * H * W
    valid = (i < H) & (j < W)
    g = _qc1_adjoint(t_ptr, ax_ptr, ay_ptr, off, i, j, H, W, valid)
    tl.store(out_ptr + off + i * W + j, g.to(out_ptr.dtype.element_ty), mask=valid)


def qc1_tables(window: int, dtype: torch.dtype, device, half: bool):
    """(offsets int32 (K', 2), directions (K', 2) in the compute dtype) for the offsets != 0,
    or for one offset of each pair {d, -d} when ``half`` (dy > 0, or dy == 0 and dx > 0)."""
    from geokernels.reference.dconvex import qc1_offsets

    offsets, n = qc1_offsets(window, compute_torch_dtype(dtype), device)
    dy, dx = offsets[:, 0], offsets[:, 1]
    keep = ((dy > 0) | ((dy == 0) & (dx > 0))) if half else ((dy != 0) | (dx != 0))
    return offsets[keep].to(torch.int32).contiguous(), n[keep].contiguous()


@torch.library.custom_op("geokernels_triton::qc1_loss_forward", mutates_args=())
def qc1_loss_forward(u: torch.Tensor, window: int, reduction: str) -> torch.Tensor:
    u = u.contiguous()
    H, W = u.shape[-2:]
    grid = tile_grid(u, QC1_BLOCK_H, QC1_BLOCK_W)
    offs, dirs = qc1_tables(window, u.dtype, u.device, half=True)
    cdt = compute_dtype(u.dtype)
    if reduction == "none":
        out = torch.empty_like(u)
        with device_guard(u):
            _qc1_fwd_kernel[grid](u, offs, dirs, out, out, H, W, offs.shape[0], WRITE_MAP=True,
                                  CDT=cdt, EXACT_MUL=u.is_cuda, BH=QC1_BLOCK_H, BW=QC1_BLOCK_W)
        return out
    partials = torch.empty(grid[0], dtype=torch.float64, device=u.device)
    with device_guard(u):
        _qc1_fwd_kernel[grid](u, offs, dirs, u, partials, H, W, offs.shape[0], WRITE_MAP=False,
                              CDT=cdt, EXACT_MUL=u.is_cuda, BH=QC1_BLOCK_H, BW=QC1_BLOCK_W)
    total = partials.sum()
    if reduction == "mean":
        total = total / (u.numel() * window * window)
    return total.to(u.dtype)


@qc1_loss_forward.register_fake
def _(u, window, reduction):
    if reduction == "none":
        return torch.empty_like(u, memory_format=torch.contiguous_format)
    return u.new_empty(())


def qc1_grad(u: torch.Tensor, weight: torch.Tensor, weight_is_map: bool, window: int,
             finish: bool = True):
    """grad u of sum_q W(q) l(q) (u contiguous). ``weight``: the (B, C, H, W) map or a 1-element
    tensor. With finish=False returns the (T, AX, AY) buffers instead (CGPM fuses the rest)."""
    H, W = u.shape[-2:]
    grid = tile_grid(u, QC1_BLOCK_H, QC1_BLOCK_W)
    offs, dirs = qc1_tables(window, u.dtype, u.device, half=False)
    cdt = compute_torch_dtype(u.dtype)
    t = torch.empty(u.shape, dtype=cdt, device=u.device)
    ax = torch.empty_like(t)
    ay = torch.empty_like(t)
    with device_guard(u):  # also covers CGPM's calls
        _qc1_bwd_gather_kernel[grid](u, weight, offs, dirs, t, ax, ay, H, W, offs.shape[0],
                                     W_MAP=weight_is_map, CDT=compute_dtype(u.dtype),
                                     EXACT_MUL=u.is_cuda, BH=QC1_BLOCK_H, BW=QC1_BLOCK_W)
    if not finish:
        return t, ax, ay
    out = torch.empty_like(u)
    with device_guard(u):
        _qc1_bwd_finish_kernel[grid](t, ax, ay, out, H, W, BH=QC1_BLOCK_H, BW=QC1_BLOCK_W)
    return out


@torch.library.custom_op("geokernels_triton::qc1_loss_backward", mutates_args=())
def qc1_loss_backward(grad: torch.Tensor, u: torch.Tensor, window: int, reduction: str) -> torch.Tensor:
    u = u.contiguous()
    cdt = compute_torch_dtype(u.dtype)
    if reduction == "none":
        return qc1_grad(u, grad.to(u.dtype).contiguous(), True, window)
    w = grad.reshape(1).to(cdt)  # stays on the device: no host sync
    if reduction == "mean":
        w = w / (u.numel() * window * window)
    return qc1_grad(u, w.contiguous(), False, window)


@qc1_loss_backward.register_fake
def _(grad, u, window, reduction):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _qc1_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _qc1_backward(ctx, grad):
    refuse_double_backward("qc1_loss")
    (u,) = ctx.saved_tensors
    return (qc1_loss_backward(grad, u, *ctx.args),) + (None,) * len(ctx.args)


qc1_loss_forward.register_autograd(_qc1_backward, setup_context=_qc1_setup_context)
