"""Triton kernels of flow-mismatch scoring (SPEC.md 3), wrapped as torch.library custom ops.

The same Philox4x32-10 + Box-Muller stream as the C++/CUDA kernels (see
csrc/include/geokernels/philox.h): every multiply-add is an explicit fma and no plain product
feeds an addition, so on a GPU the normals are bit-identical to the CUDA kernels. (Under
TRITON_INTERPRET=1 numpy evaluates tl.fma as a*b + c, so CPU-interpreted normals agree with the
compiled ones to float32 rounding only.)

Path building: one program per (path, element block). Fused reduction: one program per (image,
pixel block). Up to K = 32 it holds a (pixels, K) tile of mismatches: min/max/mean reduce it,
another order statistic is selected by counting (rank of d_k = #{j: d_j < d_k} +
#{j < k: d_j == d_k}) over a (pixels, K, K) tile. Beyond, min/max/mean stream over the paths
one at a time and an order statistic counts against the columns of a (B, K, H, W) mismatch
buffer re-read one by one (no register spills for any K on sm_90, compile in < 1 s; the
(pixels, K, K) tile at K = 128 spilled and took 3 min to compile). NaN propagates. Each program
writes its own "non-finite seen" flag (no atomics, deterministic).

Grids are 1-D, programs numbered row-major over (path or image, block) and split in int64 inside
the kernels: CUDA caps grid axes 1 and 2 at 65535 (Triton does not check, the launch fails with
"invalid argument"), which the block count of a 2048x2048 image or B*K paths can exceed; axis 0
allows 2^31 - 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from geokernels.triton._tiles import compute_dtype, compute_torch_dtype, device_guard, scalar_args

ELEM_BLOCK = 256
PIX_BLOCK = 64
STREAM_BLOCK = 256


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _box_muller(xr, xa):
    """(R cos theta, R sin theta): the formula of philox.h, operation for operation."""
    w = (xr >> 8) | 1
    wbits = w.to(tl.int32).to(tl.float32).to(tl.uint32, bitcast=True)
    mbits = (wbits & 0x007FFFFF) | 0x3F800000
    e = (wbits >> 23).to(tl.int32) - (127 + 24)
    big = mbits > 0x3FB504F3
    mbits = tl.where(big, mbits - 0x00800000, mbits)
    e = tl.where(big, e + 1, e)
    f = mbits.to(tl.float32, bitcast=True) - 1.0
    p = tl.full(f.shape, 7.0376836292E-2, tl.float32)
    p = tl.fma(p, f, -1.1514610310E-1)
    p = tl.fma(p, f, 1.1676998740E-1)
    p = tl.fma(p, f, -1.2420140846E-1)
    p = tl.fma(p, f, 1.4249322787E-1)
    p = tl.fma(p, f, -1.6668057665E-1)
    p = tl.fma(p, f, 2.0000714765E-1)
    p = tl.fma(p, f, -2.4999993993E-1)
    p = tl.fma(p, f, 3.3333331174E-1)
    s = tl.fma(p, f, -0.5)
    ln_m = tl.fma(f * f, s, f)
    ef = e.to(tl.float32)
    ln_u = tl.fma(ef, -2.12194440e-4, ln_m)
    ln_u = tl.fma(ef, 0.693359375, ln_u)
    radius = tl.sqrt_rn(ln_u * -2.0)
    a = xa >> 8
    q = a >> 22
    fi = a & 0x003FFFFF
    refl = fi > 0x00200000
    gi = tl.where(refl, 0x00400000 - fi, fi)
    g = gi.to(tl.int32).to(tl.float32) * 2.384185791015625e-07
    g2 = g * g
    ps = tl.fma(g2, 0.00016044118092395365, -0.004681753925979137)
    ps = tl.fma(g2, ps, 0.07969262450933456)
    ps = tl.fma(g2, ps, -0.6459640860557556)
    ps = tl.fma(g2, ps, 1.5707963705062866)
    sin_g = g * ps
    pc = tl.fma(g2, -2.520204179745633e-05, 0.0009192602592520416)
    pc = tl.fma(g2, pc, -0.020863480865955353)
    pc = tl.fma(g2, pc, 0.25366950035095215)
    pc = tl.fma(g2, pc, -1.2337005138397217)
    cos_g = tl.fma(g2, pc, 1.0)
    s0 = tl.where(refl, cos_g, sin_g)
    c0 = tl.where(refl, sin_g, cos_g)
    odd = (q & 1) == 1
    half = (q & 2) == 2
    c1 = tl.where(odd, -s0, c0)
    s1 = tl.where(odd, c0, s0)
    cos_t = tl.where(half, -c1, c1)
    sin_t = tl.where(half, -s1, s1)
    return radius * cos_t, radius * sin_t


@triton.jit
def _normal(seed_lo, seed_hi, image, path, e):
    """eps value of flattened element e (int64) of eps(seed, image, path); image/path int64."""
    g = e >> 2
    lane = e & 3
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = (image & 0xFFFFFFFF).to(tl.uint32)
    c3 = (path & 0xFFFFFFFF).to(tl.uint32)
    k0 = (seed_lo + tl.zeros(e.shape, tl.int64)).to(tl.uint32)
    k1 = (seed_hi + tl.zeros(e.shape, tl.int64)).to(tl.uint32)
    x0, x1, x2, x3 = _philox(c0 + tl.zeros(e.shape, tl.uint32), c1 + tl.zeros(e.shape, tl.uint32),
                             c2 + tl.zeros(e.shape, tl.uint32), c3 + tl.zeros(e.shape, tl.uint32), k0, k1)
    first = lane < 2
    n_cos, n_sin = _box_muller(tl.where(first, x0, x2), tl.where(first, x1, x3))
    return tl.where((lane & 1) == 0, n_cos, n_sin)


@triton.jit
def _row_block(n, BLOCK: tl.constexpr):
    """This program's row and int64 offsets of its BLOCK elements on a 1-D grid numbered
    row-major over (row, block of a row's n elements)."""
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(n, BLOCK)
    return pid // blocks, (pid % blocks) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "image0"])
def _noise_kernel(out_ptr, CHW, K, seed_lo, seed_hi, image0, BLOCK: tl.constexpr):
    n, e = _row_block(CHW, BLOCK)
    valid = e < CHW
    eps = _normal(seed_lo, seed_hi, image0 + n // K, n % K, e)
    tl.store(out_ptr + n * CHW + e, eps.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "image0", "path_start"])
def _paths_kernel(x_ptr, noise_ptr, out_ptr, coef_ptr, CHW, K, path_start, seed_lo, seed_hi,
                  image0, HAS_NOISE: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    a = tl.load(coef_ptr)  # 1 - t and t in the compute dtype (float kernel arguments are fp32)
    t = tl.load(coef_ptr + 1)
    local, e = _row_block(CHW, BLOCK)
    n = path_start + local
    b = n // K
    valid = e < CHW
    if HAS_NOISE:
        eps = tl.load(noise_ptr + n * CHW + e, mask=valid, other=0.0).to(CDT)
    else:
        eps = _normal(seed_lo, seed_hi, image0 + b, n % K, e).to(CDT)
    x = tl.load(x_ptr + b * CHW + e, mask=valid, other=0.0).to(CDT)
    x_t = a * eps + t * x
    tl.store(out_ptr + local * CHW + e, x_t.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _mismatch(v_ptr, x_ptr, noise_ptr, n, b, k, p, mask, C: tl.constexpr, HW, seed_lo, seed_hi,
              image0, HAS_NOISE: tl.constexpr, CDT: tl.constexpr):
    """sum_c (v[n] - (x[b] - eps(b, k)))^2 at pixels p (any broadcastable index shapes)."""
    d = tl.zeros(p.shape, CDT) + tl.zeros(n.shape, CDT)
    for c in range(C):
        e = c * HW + p
        v = tl.load(v_ptr + n * C * HW + e, mask=mask, other=0.0).to(CDT)
        x = tl.load(x_ptr + b * C * HW + e, mask=mask, other=0.0).to(CDT)
        if HAS_NOISE:
            eps = tl.load(noise_ptr + n * C * HW + e, mask=mask, other=0.0).to(CDT)
        else:
            eps = _normal(seed_lo, seed_hi, image0 + b, k, e + tl.zeros(n.shape, tl.int64)).to(CDT)
        diff = v - (x - eps)
        d += diff * diff
    return d


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "image0", "path_start"])
def _delta_kernel(v_ptr, x_ptr, noise_ptr, out_ptr, C: tl.constexpr, HW, K, path_start, seed_lo,
                  seed_hi, image0, HAS_NOISE: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    local, p = _row_block(HW, BLOCK)
    n = path_start + local
    valid = p < HW
    zero = tl.zeros([BLOCK], tl.int64)
    # v of this call starts at path_start: index v by `local`, the noise/eps by the global n
    # (the shift in int64: path_start * C * HW passes 2^31 for large chunked calls)
    d = _mismatch(v_ptr - path_start.to(tl.int64) * C * HW, x_ptr, noise_ptr, n + zero,
                  n // K + zero, n % K + zero, p, valid, C, HW, seed_lo, seed_hi, image0,
                  HAS_NOISE, CDT)
    tl.store(out_ptr + local * HW + p, d.to(out_ptr.dtype.element_ty), mask=valid)


# aggregation codes (constexpr AGG): the order statistic is only counted out when it has to be
AGG_MEAN, AGG_MIN, AGG_MAX, AGG_PAIRS, AGG_LOOP = 0, 1, 2, 3, 4
# up to this many paths (padded to KP) a program holds a (pixels, KP) tile of mismatches and the
# pairwise count a (pixels, KP, KP) one; beyond, mean/min/max stream over the paths (STREAM) and
# an order statistic counts against columns re-read from a mismatch buffer (AGG_LOOP)
TILE_MAX_KP = 32


@triton.jit
def _stream_init(shape, AGG: tl.constexpr, CDT: tl.constexpr):
    if AGG == 1:
        acc = tl.full(shape, float("inf"), CDT)
    elif AGG == 2:
        acc = tl.full(shape, float("-inf"), CDT)
    else:
        acc = tl.zeros(shape, CDT)
    return acc, tl.zeros(shape, tl.int32), tl.zeros(shape, tl.int32)


@triton.jit
def _stream_add(acc, nan, nonfinite, d, AGG: tl.constexpr):
    """Fold one path's mismatches d into the running mean/min/max (and the NaN / non-finite
    flags, as _aggregate_tile sets them)."""
    if AGG == 1:
        acc = tl.minimum(acc, d)
    elif AGG == 2:
        acc = tl.maximum(acc, d)
    else:
        acc = acc + d
    nan = nan | (d != d).to(tl.int32)
    nonfinite = nonfinite | (~(d < float("inf"))).to(tl.int32)
    return acc, nan, nonfinite


@triton.jit
def _stream_result(acc, nan, K, AGG: tl.constexpr):
    if AGG == 0:
        res = acc / K
    else:
        res = tl.where(nan != 0, float("nan"), acc)
    return res


@triton.jit
def _aggregate_tile(d, kvalid, K, rank, AGG: tl.constexpr, KP: tl.constexpr):
    """agg over axis 1 of a (pixels, KP) tile whose columns >= K are padding; AGG_LOOP leaves
    the result to the caller (0 here) and returns the inf-padded tile for it."""
    inf = float("inf")
    d = tl.where(kvalid, d, inf)
    is_nan = tl.where(kvalid & (d != d), 1, 0)
    any_nan = tl.max(is_nan, axis=1) > 0
    if AGG == 0:
        res = tl.sum(tl.where(kvalid, d, 0.0), axis=1) / K
    elif AGG == 1:    # rank 1: the value the count would pick, without the K^2 comparisons
        res = tl.min(d, axis=1)
    elif AGG == 2:    # rank K
        res = tl.max(tl.where(kvalid, d, -inf), axis=1)
    elif AGG == 3:
        dk = d[:, :, None]
        dj = d[:, None, :]
        kk = tl.arange(0, KP)[None, :, None]
        jj = tl.arange(0, KP)[None, None, :]
        before = (dj < dk) | ((dj == dk) & (jj < kk))
        cnt = tl.sum(before.to(tl.int32), axis=2)
        pick = (cnt == rank - 1) & kvalid
        res = tl.sum(tl.where(pick, d, 0.0), axis=1)
    else:
        res = tl.zeros([d.shape[0]], d.dtype)
    if AGG != 0:
        res = tl.where(any_nan, float("nan"), res)
    nonfinite = tl.max(tl.where(kvalid & ~(d < inf), 1, 0), axis=1)
    return res, nonfinite, d, any_nan


@triton.jit
def _select_loop(d, kvalid, any_nan, delta_ptr, p, pv, HW, K: tl.constexpr, rank,
                 KP: tl.constexpr):
    """The rank-th smallest of each row of the inf-padded (pixels, KP) tile d, counted against
    the K columns re-read one at a time from delta_ptr ((K, HW) of this image): O(pixels * KP)
    registers instead of the pairwise tile's O(pixels * KP^2), same tie and NaN rules."""
    kk = tl.arange(0, KP)[None, :]
    cnt = tl.zeros(d.shape, tl.int32)
    col = delta_ptr + p        # column j's pointers, advanced by HW (pointer arithmetic: 64-bit)
    for j in range(K):
        dj = tl.load(col, mask=pv, other=0.0).to(d.dtype)[:, None]
        before = (dj < d) | ((dj == d) & (j < kk))
        cnt += before.to(tl.int32)
        col += HW
    pick = (cnt == rank - 1) & kvalid
    res = tl.sum(tl.where(pick, d, 0.0), axis=1)
    return tl.where(any_nan, float("nan"), res)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "image0"])
def _accumulate_kernel(heat_ptr, v_ptr, x_ptr, noise_ptr, flag_ptr, weight_ptr, C: tl.constexpr,
                       HW, K: tl.constexpr, rank, seed_lo, seed_hi, image0,
                       HAS_NOISE: tl.constexpr, AGG: tl.constexpr, STREAM: tl.constexpr,
                       CDT: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    b, p = _row_block(HW, BLOCK)
    pv = p < HW
    if STREAM:   # mean/min/max of many paths: one path at a time, O(BLOCK) registers
        zero = tl.zeros([BLOCK], tl.int64)
        acc, nan, nonfinite = _stream_init([BLOCK], AGG, CDT)
        for kk in range(K):
            k = kk + zero
            d = _mismatch(v_ptr, x_ptr, noise_ptr, b * K + k, b + zero, k, p, pv, C, HW,
                          seed_lo, seed_hi, image0, HAS_NOISE, CDT)
            acc, nan, nonfinite = _stream_add(acc, nan, nonfinite, d, AGG)
        res = _stream_result(acc, nan, K, AGG)
    else:        # AGG < AGG_LOOP (the host routes AGG_LOOP through a mismatch buffer)
        k = tl.arange(0, KP).to(tl.int64)
        kvalid = (k < K)[None, :] & pv[:, None]
        n = b * K + k
        d = _mismatch(v_ptr, x_ptr, noise_ptr, n[None, :], b + tl.zeros([1, KP], tl.int64),
                      k[None, :], p[:, None], kvalid, C, HW, seed_lo, seed_hi, image0,
                      HAS_NOISE, CDT)
        res, nonfinite, _d, _n = _aggregate_tile(d, kvalid, K, rank, AGG, KP)
    h = tl.load(heat_ptr + b * HW + p, mask=pv, other=0.0)
    tl.store(heat_ptr + b * HW + p, h + tl.load(weight_ptr) * res, mask=pv)
    tl.store(flag_ptr + tl.program_id(0), tl.max(tl.where(pv, nonfinite, 0), axis=0))


@triton.jit
def _aggregate_kernel(heat_ptr, delta_ptr, flag_ptr, weight_ptr, HW, K: tl.constexpr, rank,
                      AGG: tl.constexpr, STREAM: tl.constexpr, CDT: tl.constexpr,
                      KP: tl.constexpr, BLOCK: tl.constexpr):
    b, p = _row_block(HW, BLOCK)
    pv = p < HW
    if STREAM:
        acc, nan, nonfinite = _stream_init([BLOCK], AGG, CDT)
        col = delta_ptr + b * K * HW + p
        for kk in range(K):
            d = tl.load(col, mask=pv, other=0.0).to(CDT)
            acc, nan, nonfinite = _stream_add(acc, nan, nonfinite, d, AGG)
            col += HW
        res = _stream_result(acc, nan, K, AGG)
    else:
        k = tl.arange(0, KP).to(tl.int64)
        kvalid = (k < K)[None, :] & pv[:, None]
        d = tl.load(delta_ptr + (b * K + k[None, :]) * HW + p[:, None], mask=kvalid,
                    other=0.0).to(CDT)
        res, nonfinite, d, any_nan = _aggregate_tile(d, kvalid, K, rank, AGG, KP)
        if AGG == 4:
            res = _select_loop(d, kvalid, any_nan, delta_ptr + b * K * HW, p, pv, HW, K, rank,
                               KP)
    h = tl.load(heat_ptr + b * HW + p, mask=pv, other=0.0)
    tl.store(heat_ptr + b * HW + p, h + tl.load(weight_ptr) * res, mask=pv)
    tl.store(flag_ptr + tl.program_id(0), tl.max(tl.where(pv, nonfinite, 0), axis=0))


# ---- host side ----------------------------------------------------------------------------------
def _seed_words(seed: int) -> tuple[int, int]:
    s = seed % 2**64
    return s & 0xFFFFFFFF, s >> 32


def _launch_config(K: int, rank: int, mean: bool) -> dict:
    """AGG, STREAM, KP and BLOCK (pixels per program) of an aggregation over K paths."""
    kp = triton.next_power_of_2(K)
    tile = kp <= TILE_MAX_KP
    if mean:
        agg = AGG_MEAN
    elif rank == 1:
        agg = AGG_MIN
    elif rank == K:
        agg = AGG_MAX
    else:
        agg = AGG_PAIRS if tile else AGG_LOOP
    if agg == AGG_PAIRS:
        block = max(16, min(PIX_BLOCK, 4096 // (kp * kp)))
    elif agg == AGG_LOOP:   # a (BLOCK, KP) tile of 2048 elements; 1 pixel per program at K > 1024
        block = max(1, min(PIX_BLOCK, 2048 // kp))
    elif not tile:          # streaming: a few pixels per thread, no tile
        block = STREAM_BLOCK
    else:
        block = PIX_BLOCK
    return dict(AGG=agg, STREAM=not tile and agg != AGG_LOOP, KP=kp, BLOCK=block)


@torch.library.custom_op("geokernels_triton::flow_mismatch_noise", mutates_args=())
def noise(x: torch.Tensor, seed: int, image_offset: int, num_paths: int) -> torch.Tensor:
    B, C, H, W = x.shape
    out = torch.empty(B, num_paths, C, H, W, dtype=x.dtype, device=x.device)
    lo, hi = _seed_words(seed)
    with device_guard(x):
        _noise_kernel[(B * num_paths * triton.cdiv(C * H * W, ELEM_BLOCK),)](
            out, C * H * W, num_paths, lo, hi, image_offset, BLOCK=ELEM_BLOCK)
    return out


@noise.register_fake
def _(x, seed, image_offset, num_paths):
    B, C, H, W = x.shape
    return x.new_empty((B, num_paths, C, H, W))


@torch.library.custom_op("geokernels_triton::flow_mismatch_paths", mutates_args=())
def paths(x: torch.Tensor, noise: Optional[torch.Tensor], t: float, seed: int, image_offset: int,
          num_paths: int, path_start: int, path_count: int) -> torch.Tensor:
    x = x.contiguous()
    B, C, H, W = x.shape
    out = torch.empty(path_count, C, H, W, dtype=x.dtype, device=x.device)
    if path_count == 0:
        return out
    lo, hi = _seed_words(seed)
    nz = noise.contiguous() if noise is not None else x
    with device_guard(x):
        _paths_kernel[(path_count * triton.cdiv(C * H * W, ELEM_BLOCK),)](
            x, nz, out, scalar_args(x, [1.0 - t, t]), C * H * W, num_paths, path_start, lo, hi,
            image_offset, HAS_NOISE=noise is not None, CDT=compute_dtype(x.dtype), BLOCK=ELEM_BLOCK)
    return out


@paths.register_fake
def _(x, noise, t, seed, image_offset, num_paths, path_start, path_count):
    return x.new_empty((path_count,) + tuple(x.shape[1:]))


@torch.library.custom_op("geokernels_triton::flow_mismatch_delta", mutates_args=())
def delta(v: torch.Tensor, x: torch.Tensor, noise: Optional[torch.Tensor], seed: int,
          image_offset: int, num_paths: int, path_start: int) -> torch.Tensor:
    x, v = x.contiguous(), v.contiguous()
    B, C, H, W = x.shape
    count = v.shape[0]
    # mismatches in the compute dtype: float32 for float16/bfloat16 x (no rounding before the rank)
    out = torch.empty(count, H, W, dtype=compute_torch_dtype(x.dtype), device=x.device)
    if count:
        _launch_delta(out, v, x, noise, seed, image_offset, num_paths, path_start)
    return out


def _launch_delta(out, v, x, noise, seed, image_offset, num_paths, path_start):
    """out (count, H, W) or (B, K, H, W) <- the mismatch of paths path_start.. (v's rows)."""
    B, C, H, W = x.shape
    count = v.shape[0]
    lo, hi = _seed_words(seed)
    nz = noise.contiguous() if noise is not None else x
    with device_guard(x):
        _delta_kernel[(count * triton.cdiv(H * W, PIX_BLOCK),)](
            v, x, nz, out, C, H * W, num_paths, path_start, lo, hi, image_offset,
            HAS_NOISE=noise is not None, CDT=compute_dtype(x.dtype), BLOCK=PIX_BLOCK)


@delta.register_fake
def _(v, x, noise, seed, image_offset, num_paths, path_start):
    return x.new_empty((v.shape[0],) + tuple(x.shape[2:]), dtype=compute_torch_dtype(x.dtype))


@torch.library.custom_op("geokernels_triton::flow_mismatch_accumulate_", mutates_args=("heat",))
def accumulate_(heat: torch.Tensor, v: torch.Tensor, x: torch.Tensor, noise: Optional[torch.Tensor],
                weight: float, seed: int, image_offset: int, num_paths: int, rank: int,
                mean: bool) -> torch.Tensor:
    x, v = x.contiguous(), v.contiguous()
    B, C, H, W = x.shape
    cfg = _launch_config(num_paths, rank, mean)
    if cfg["AGG"] == AGG_LOOP:   # an order statistic of many paths: mismatches, then the count
        d = torch.empty(B, num_paths, H, W, dtype=compute_torch_dtype(heat.dtype), device=x.device)
        _launch_delta(d, v, x, noise, seed, image_offset, num_paths, 0)
        return aggregate_(heat, d, weight, rank, mean)
    work = heat if heat.is_contiguous() else heat.contiguous()
    grid = (B * triton.cdiv(H * W, cfg["BLOCK"]),)  # one flag per program
    flags = torch.zeros(grid[0], dtype=torch.int32, device=x.device)
    lo, hi = _seed_words(seed)
    nz = noise.contiguous() if noise is not None else x
    with device_guard(x):
        _accumulate_kernel[grid](work, v, x, nz, flags, scalar_args(work, [weight]), C, H * W,
                                 num_paths, rank, lo, hi, image_offset,
                                 HAS_NOISE=noise is not None, CDT=compute_dtype(work.dtype), **cfg)
    if work is not heat:
        heat.copy_(work)
    return flags.any()


@accumulate_.register_fake
def _(heat, v, x, noise, weight, seed, image_offset, num_paths, rank, mean):
    return heat.new_empty((), dtype=torch.bool)


@torch.library.custom_op("geokernels_triton::flow_mismatch_aggregate_", mutates_args=("heat",))
def aggregate_(heat: torch.Tensor, delta: torch.Tensor, weight: float, rank: int,
               mean: bool) -> torch.Tensor:
    delta = delta.contiguous()
    B, K, H, W = delta.shape
    work = heat if heat.is_contiguous() else heat.contiguous()
    cfg = _launch_config(K, rank, mean)
    grid = (B * triton.cdiv(H * W, cfg["BLOCK"]),)  # one flag per program
    flags = torch.zeros(grid[0], dtype=torch.int32, device=delta.device)
    with device_guard(delta):
        _aggregate_kernel[grid](work, delta, flags, scalar_args(work, [weight]), H * W, K, rank,
                                CDT=compute_dtype(work.dtype), **cfg)
    if work is not heat:
        heat.copy_(work)
    return flags.any()


@aggregate_.register_fake
def _(heat, delta, weight, rank, mean):
    return heat.new_empty((), dtype=torch.bool)
