"""Triton kernels of the unrolled CFSS iterations (SPEC.md 2.4), as torch.library custom ops.

One launch per iteration (forward) and per reverse step (backward); each program handles a 2-D
tile of one plane and recomputes its stencil inputs from global memory (the Gaussian window, the
dual variable at the pixel and its top/left neighbours) instead of staging them. The Gaussian taps
are computed on the device from sigma in ``params`` ([eps, tau, lam, sigma]): no host sync.
The checkpoint/replay driver and the reverse-step algebra mirror csrc/cpu/cfss.cpp and
csrc/cpu/cfss_kernel.h (see there). Scalar-gradient sums are per-program partials (each program
owns its slot), added in a fixed order. Runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from geokernels.ops._validate import refuse_double_backward
from geokernels.ops.cfss import num_saved_states
from geokernels.triton._tiles import compute_dtype, device_guard, tile_coords, tile_grid

BLOCK_H = 16
BLOCK_W = 32


@triton.jit
def _tap(taps_ptr, a, HALF: tl.constexpr, CDT: tl.constexpr):
    """w[a] and dw[a] (d/dsigma) of the normalised 1-D Gaussian, precomputed on the device."""
    return (tl.load(taps_ptr + (a + HALF)).to(CDT),
            tl.load(taps_ptr + (2 * HALF + 1) + (a + HALF)).to(CDT))


@triton.jit
def _ld(ptr, i, j, H, W, CDT: tl.constexpr):
    inside = (i >= 0) & (i < H) & (j >= 0) & (j < W)
    return tl.load(ptr + i * W + j, mask=inside, other=0.0).to(CDT)


@triton.jit
def _v(u_ptr, i, j, H, W, CDT: tl.constexpr):
    inside = (i >= 0) & (i < H) & (j >= 0) & (j < W)
    return tl.where(inside, 1.0 - 2.0 * _ld(u_ptr, i, j, H, W, CDT), 0.0)


@triton.jit
def _dual(u_ptr, q_ptr, t0_ptr, t1_ptr, i, j, H, W, tau, NONNEG: tl.constexpr, CDT: tl.constexpr):
    """r, q~ and q_t at (i, j) (q_t = 0 outside the image, where T is 0 as well)."""
    uc = _ld(u_ptr, i, j, H, W, CDT)
    d0 = _ld(u_ptr, i + 1, j, H, W, CDT) - uc
    d1 = _ld(u_ptr, i, j + 1, H, W, CDT) - uc
    T0 = _ld(t0_ptr, i, j, H, W, CDT)
    T1 = _ld(t1_ptr, i, j, H, W, CDT)
    r = T0 * d0 + T1 * d1
    qtil = _ld(q_ptr, i, j, H, W, CDT) - tau * r
    if NONNEG:
        qt = tl.maximum(qtil, 0.0)
    else:
        qt = qtil
    return d0, d1, T0, T1, r, qtil, qt


@triton.jit
def _init_kernel(o_ptr, p_ptr, u_ptr, q_ptr, H, W, CDT: tl.constexpr, BH: tl.constexpr,
                 BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    off = plane * H * W + i * W + j
    valid = (i < H) & (j < W)
    eps = tl.load(p_ptr).to(CDT)
    o = tl.load(o_ptr + off, mask=valid, other=0.0).to(CDT)
    tl.store(u_ptr + off, (1.0 / (1.0 + tl.exp(0.0 - o / eps))).to(u_ptr.dtype.element_ty), mask=valid)
    tl.store(q_ptr + off, (o * 0.0).to(q_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _step_kernel(o_ptr, t_ptr, p_ptr, taps_ptr, u_ptr, q_ptr, un_ptr, qn_ptr, z_ptr, H, W,
                 HALF: tl.constexpr, NONNEG: tl.constexpr, LAST: tl.constexpr, CDT: tl.constexpr,
                 BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    hw = H * W
    ub = u_ptr + plane * hw
    qb = q_ptr + plane * hw
    t0b = t_ptr + 2 * plane * hw
    t1b = t0b + hw
    eps = tl.load(p_ptr).to(CDT)
    tau = tl.load(p_ptr + 1).to(CDT)
    lam = tl.load(p_ptr + 2).to(CDT)
    p = tl.zeros((BH, BW), dtype=CDT)
    for a in range(-HALF, HALF + 1):
        wa, _ = _tap(taps_ptr, a, HALF, CDT)
        hrow = tl.zeros((BH, BW), dtype=CDT)
        for b in tl.static_range(-HALF, HALF + 1):
            wb, _ = _tap(taps_ptr, b, HALF, CDT)
            hrow += wb * _v(ub, i + a, j + b, H, W, CDT)
        p += wa * hrow
    _a0, _a1, T0, T1, _r, _qa, qt = _dual(ub, qb, t0b, t1b, i, j, H, W, tau, NONNEG, CDT)
    _b0, _b1, T0u, _c1, _r2, _qb, qt_up = _dual(ub, qb, t0b, t1b, i - 1, j, H, W, tau, NONNEG, CDT)
    _e0, _e1, _c0, T1l, _r3, _qc, qt_left = _dual(ub, qb, t0b, t1b, i, j - 1, H, W, tau, NONNEG, CDT)
    D = (T0 * qt - T0u * qt_up) + (T1 * qt - T1l * qt_left)
    o = _ld(o_ptr + plane * hw, i, j, H, W, CDT)
    z = (o - lam * p - D) / eps
    valid = (i < H) & (j < W)
    off = plane * hw + i * W + j
    if LAST:
        tl.store(z_ptr + off, z.to(z_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(un_ptr + off, (1.0 / (1.0 + tl.exp(0.0 - z))).to(un_ptr.dtype.element_ty), mask=valid)
        tl.store(qn_ptr + off, qt.to(qn_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _adj_dual(u_ptr, q_ptr, t0_ptr, t1_ptr, a_ptr, gq_ptr, i, j, H, W, eps, tau,
              HAS_GQ: tl.constexpr, NONNEG: tl.constexpr, CDT: tl.constexpr):
    """The per-pixel adjoint of the dual update at (i, j): g_r, gq~ and what g_T needs."""
    d0, d1, T0, T1, r, qtil, qt = _dual(u_ptr, q_ptr, t0_ptr, t1_ptr, i, j, H, W, tau, NONNEG, CDT)
    Ac = _ld(a_ptr, i, j, H, W, CDT)
    gm0 = (_ld(a_ptr, i + 1, j, H, W, CDT) - Ac) / eps
    gm1 = (_ld(a_ptr, i, j + 1, H, W, CDT) - Ac) / eps
    gq = T0 * gm0 + T1 * gm1
    if HAS_GQ:
        gq = _ld(gq_ptr, i, j, H, W, CDT) + gq
    if NONNEG:
        gq = tl.where(qtil > 0.0, gq, 0.0)
    gr = 0.0 - tau * gq
    return d0, d1, T0, T1, r, qt, gm0, gm1, gq, gr


@triton.jit
def _reverse_kernel(o_ptr, t_ptr, p_ptr, taps_ptr, u_ptr, q_ptr, a_ptr, gq_ptr, ap_ptr, gqo_ptr, go_ptr,
                    gt_ptr, sums_ptr, H, W, HALF: tl.constexpr, NONNEG: tl.constexpr,
                    HAS_GQ: tl.constexpr, CDT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    hw = H * W
    ub = u_ptr + plane * hw
    qb = q_ptr + plane * hw
    ab = a_ptr + plane * hw
    gqb = gq_ptr + plane * hw
    t0b = t_ptr + 2 * plane * hw
    t1b = t0b + hw
    eps = tl.load(p_ptr).to(CDT)
    tau = tl.load(p_ptr + 1).to(CDT)
    lam = tl.load(p_ptr + 2).to(CDT)
    valid = (i < H) & (j < W)
    d0, d1, T0, T1, r, qt, gm0, gm1, gq, gr = _adj_dual(
        ub, qb, t0b, t1b, ab, gqb, i, j, H, W, eps, tau, HAS_GQ, NONNEG, CDT)
    _a0, _a1, T0u, _b1, _r1, qt_up, _g0, _g1, _gq1, gr_up = _adj_dual(
        ub, qb, t0b, t1b, ab, gqb, i - 1, j, H, W, eps, tau, HAS_GQ, NONNEG, CDT)
    _c0, _c1, _b0, T1l, _r2, qt_left, _h0, _h1, _gq2, gr_left = _adj_dual(
        ub, qb, t0b, t1b, ab, gqb, i, j - 1, H, W, eps, tau, HAS_GQ, NONNEG, CDT)
    D = (T0 * qt - T0u * qt_up) + (T1 * qt - T1l * qt_left)
    ndiv = (T0 * gr - T0u * gr_up) + (T1 * gr - T1l * gr_left)
    # p = k * v and gv = k * A (2-D sums), and the 1-D passes of the sigma gradient
    p = tl.zeros((BH, BW), dtype=CDT)
    gv = tl.zeros((BH, BW), dtype=CDT)
    hx = tl.zeros((BH, BW), dtype=CDT)
    hxd = tl.zeros((BH, BW), dtype=CDT)
    ly = tl.zeros((BH, BW), dtype=CDT)
    lyd = tl.zeros((BH, BW), dtype=CDT)
    for a in range(-HALF, HALF + 1):
        wa, dwa = _tap(taps_ptr, a, HALF, CDT)
        hv = tl.zeros((BH, BW), dtype=CDT)
        ha = tl.zeros((BH, BW), dtype=CDT)
        for b in tl.static_range(-HALF, HALF + 1):
            wb, _ = _tap(taps_ptr, b, HALF, CDT)
            hv += wb * _v(ub, i + a, j + b, H, W, CDT)
            ha += wb * _ld(ab, i + a, j + b, H, W, CDT)
        p += wa * hv
        gv += wa * ha
        vr = _v(ub, i, j + a, H, W, CDT)
        hx += wa * vr
        hxd += dwa * vr
        ar = _ld(ab, i + a, j, H, W, CDT)
        ly += wa * ar
        lyd += dwa * ar
    o = _ld(o_ptr + plane * hw, i, j, H, W, CDT)
    z = (o - lam * p - D) / eps
    Ac = _ld(ab, i, j, H, W, CDT)
    uc = _ld(ub, i, j, H, W, CDT)
    gu = (2.0 * lam / eps) * gv - ndiv
    off = plane * hw + i * W + j
    tl.store(ap_ptr + off, (gu * uc * (1.0 - uc)).to(ap_ptr.dtype.element_ty), mask=valid)
    tl.store(gqo_ptr + off, gq.to(gqo_ptr.dtype.element_ty), mask=valid)
    go = tl.load(go_ptr + off, mask=valid, other=0.0)
    tl.store(go_ptr + off, go + Ac.to(go_ptr.dtype.element_ty), mask=valid)
    toff0 = 2 * plane * hw + i * W + j
    g0 = tl.load(gt_ptr + toff0, mask=valid, other=0.0)
    tl.store(gt_ptr + toff0, g0 + (qt * gm0 + gr * d0).to(gt_ptr.dtype.element_ty), mask=valid)
    g1 = tl.load(gt_ptr + toff0 + hw, mask=valid, other=0.0)
    tl.store(gt_ptr + toff0 + hw, g1 + (qt * gm1 + gr * d1).to(gt_ptr.dtype.element_ty), mask=valid)
    zero = tl.zeros((BH, BW), dtype=CDT)
    s_za = tl.sum(tl.sum(tl.where(valid, z * Ac, zero).to(tl.float64), axis=1), axis=0)
    s_rg = tl.sum(tl.sum(tl.where(valid, r * gq, zero).to(tl.float64), axis=1), axis=0)
    s_pa = tl.sum(tl.sum(tl.where(valid, p * Ac, zero).to(tl.float64), axis=1), axis=0)
    s_sg = tl.sum(tl.sum(tl.where(valid, lyd * hx + ly * hxd, zero).to(tl.float64), axis=1), axis=0)
    sp = sums_ptr + pid * 4
    tl.store(sp, tl.load(sp) + s_za)
    tl.store(sp + 1, tl.load(sp + 1) + s_rg)
    tl.store(sp + 2, tl.load(sp + 2) + s_pa)
    tl.store(sp + 3, tl.load(sp + 3) + s_sg)


def gaussian_taps(sigma: torch.Tensor, halfsize: int) -> torch.Tensor:
    """(2, 2h+1): the normalised 1-D taps w and dw/dsigma (csrc/include/geokernels/cfss_math.h),
    computed on sigma's device with torch ops (no host sync)."""
    a = torch.arange(-halfsize, halfsize + 1, dtype=sigma.dtype, device=sigma.device)
    a2 = a * a
    g = torch.exp(-a2 / (2 * sigma * sigma))
    s = g.sum()
    ds = (g * a2).sum() / sigma**3
    den = s * s + 1e-15
    w = g / torch.sqrt(den)
    dw = w * (a2 / sigma**3 - s * ds / den)
    return torch.stack((w, dw)).contiguous()


class _Runner:
    """Launches for one call; states are (2, B, C, H, W) tensors (u, q)."""

    def __init__(self, o, T, params, halfsize, q_nonneg):
        self.o, self.T, self.params = o, T, params
        self.H, self.W = o.shape[-2:]
        self.grid = tile_grid(o, BLOCK_H, BLOCK_W)
        self.kw = dict(CDT=compute_dtype(o.dtype), BH=BLOCK_H, BW=BLOCK_W)
        self.half, self.nonneg = halfsize, q_nonneg
        self.taps = gaussian_taps(params[3], halfsize)

    def init(self):
        s = torch.empty((2,) + tuple(self.o.shape), dtype=self.o.dtype, device=self.o.device)
        _init_kernel[self.grid](self.o, self.params, s[0], s[1], self.H, self.W, **self.kw)
        return s

    def step(self, s, dst=None, z=None):
        last = z is not None
        if dst is None and not last:
            dst = torch.empty_like(s)
        un, qn = (dst[0], dst[1]) if dst is not None else (s[0], s[1])
        _step_kernel[self.grid](self.o, self.T, self.params, self.taps, s[0], s[1], un, qn,
                                z if last else s[0], self.H, self.W, HALF=self.half,
                                NONNEG=self.nonneg, LAST=last, **self.kw)
        return dst


@torch.library.custom_op("geokernels_triton::cfss_forward", mutates_args=())
def cfss_forward(o: torch.Tensor, T: torch.Tensor, params: torch.Tensor, iters: int, halfsize: int,
                 q_nonneg: bool, checkpoint_every: int,
                 save_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with device_guard(o):
        o = o.contiguous()
        T = T.to(o.dtype).contiguous()
        params = params.to(o.dtype).contiguous()
        k = checkpoint_every
        n_saved = num_saved_states(iters, k) if save_states else 0
        states = o.new_empty((n_saved, 2) + tuple(o.shape))
        if iters == 0:
            return o / params[0], states
        run = _Runner(o, T, params, halfsize, q_nonneg)
        z = torch.empty_like(o)
        s = run.init()
        for t in range(1, iters + 1):
            if t == iters:
                run.step(s, z=z)
            elif n_saved and t % k == 0:
                s = run.step(s, dst=states[t // k - 1])
            else:
                s = run.step(s)
        return z, states


@cfss_forward.register_fake
def _(o, T, params, iters, halfsize, q_nonneg, checkpoint_every, save_states):
    n = num_saved_states(iters, checkpoint_every) if save_states else 0
    return (torch.empty_like(o, memory_format=torch.contiguous_format),
            o.new_empty((n, 2) + tuple(o.shape)))


@torch.library.custom_op("geokernels_triton::cfss_backward", mutates_args=())
def cfss_backward(grad_z: torch.Tensor, o: torch.Tensor, T: torch.Tensor, params: torch.Tensor,
                  states: torch.Tensor, iters: int, halfsize: int, q_nonneg: bool,
                  checkpoint_every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(o):
        o = o.contiguous()
        T = T.to(o.dtype).contiguous()
        pc = params.to(o.dtype).contiguous()
        # nothing saved (a forward with save_states=False): the bisection schedule needs no states
        k = 0 if states.shape[0] == 0 else checkpoint_every
        run = _Runner(o, T, pc, halfsize, q_nonneg)
        g_o = torch.zeros_like(o)
        g_T = torch.zeros_like(T)
        sums = torch.zeros((run.grid[0], 4), dtype=torch.float64, device=o.device)
        adj = {"A": grad_z.to(o.dtype).contiguous(), "gq": None}

        def reverse(x):  # the reverse of one iteration, given the state before it
            A, gq = adj["A"], adj["gq"]
            A_prev = torch.empty_like(o)
            gq_out = torch.empty_like(o)
            _reverse_kernel[run.grid](o, T, pc, run.taps, x[0], x[1], A, gq if gq is not None else A, A_prev,
                                      gq_out, g_o, g_T, sums, run.H, run.W, HALF=halfsize,
                                      NONNEG=q_nonneg, HAS_GQ=gq is not None, num_warps=8, **run.kw)
            adj["A"], adj["gq"] = A_prev, gq_out

        def replay(src, n):  # n iterations from src (None = the initial state)
            cur = run.init() if src is None else src
            for _ in range(n):
                cur = run.step(cur)
            return cur

        def reverse_range(a, sa, b):  # bisection schedule (csrc/cpu/cfss.cpp)
            if b - a == 1:
                reverse(replay(sa, 0))
                return
            mid = a + (b - a) // 2
            reverse_range(mid, replay(sa, mid - a), b)
            reverse_range(a, sa, mid)

        if iters >= 1 and k == 0:
            reverse_range(0, None, iters)
        elif iters >= 1:
            n_seg = num_saved_states(iters, k) + 1
            for s in range(n_seg - 1, -1, -1):
                t0, t1 = s * k, min((s + 1) * k, iters)
                seg = [run.init() if s == 0 else states[s - 1]]
                for _ in range(t0 + 1, t1):
                    seg.append(run.step(seg[-1]))
                for t in range(t1, t0, -1):
                    reverse(seg[t - t0 - 1])
        A = adj["A"]
        # the initial state u0 = sigmoid(o / eps): A is now dL/dz0
        eps, lam = pc[0].double(), pc[2].double()
        g_o = (g_o + A) / pc[0]
        tot = sums.sum(dim=0)
        s_za = tot[0] + ((o.double() / eps) * A.double()).sum()
        g_params = torch.stack([-s_za / eps, -tot[1], -tot[2] / eps, -lam / eps * tot[3]])
        return g_o, g_T.to(T.dtype), g_params.to(params.dtype)


@cfss_backward.register_fake
def _(grad_z, o, T, params, states, iters, halfsize, q_nonneg, checkpoint_every):
    return (torch.empty_like(o, memory_format=torch.contiguous_format),
            torch.empty_like(T, memory_format=torch.contiguous_format),
            torch.empty_like(params, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    o, T, params, iters, halfsize, q_nonneg, every, save = inputs
    ctx.save_for_backward(o, T, params, output[1])
    ctx.args = (iters, halfsize, q_nonneg, every)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_z, grad_states):
    refuse_double_backward("cfss_iterate")
    o, T, params, states = ctx.saved_tensors
    if grad_z is None:
        grad_z = torch.zeros_like(o)
    g_o, g_T, g_p = cfss_backward(grad_z, o, T, params, states, *ctx.args)
    return g_o, g_T, g_p, None, None, None, None, None


cfss_forward.register_autograd(_backward, setup_context=_setup_context)
