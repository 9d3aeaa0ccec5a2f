"""Triton kernels of local midpoint convexification (SPEC.md 1.6), as torch.library custom ops.

Forward: one launch per Jacobi sweep, one program per 2-D tile, a runtime loop over the K pair
offsets of D(r) with masked loads (zero outside the image); risen pixels pick their source with
the row-major scan of csrc/cpu/midpoint_common.h, vectorised over the tile. mode="fast" runs the
same Jacobi schedule here (Triton has no cheap in-place tile update), so it returns the Jacobi
result and sweep count.

No host sync per sweep: each sweep writes per-program maxima of u' - u; a device-side "stopped"
flag and sweep counter are updated with tensor ops, every kernel reads the flag and writes
nothing once it is set, and the host reads the flag only every ``SYNC_EVERY`` sweeps. The result
is the buffer of the last sweep that ran (chosen by parity on the device).

Backward: the scatter-add into sources is made deterministic (and bit-identical to the C++ and
CUDA kernels) by a stable sort of the source indices followed by one in-order sum per source.
Runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from geokernels._checks import get_checks
from geokernels.ops import midpoint as _ops
from geokernels.reference.midpoint import midpoint_offsets
from geokernels.triton._tiles import compute_dtype, device_guard, tile_coords, tile_grid

BLOCK_H = 16
BLOCK_W = 32
BLOCK_SEGMENTS = 256
SYNC_EVERY = 8  # sweeps between host reads of the stopped flag


@triton.jit
def _load_shifted(base, i, j, H, W, valid, other):
    inside = valid & (i >= 0) & (i < H) & (j >= 0) & (j < W)
    return tl.load(base + i * W + j, mask=inside, other=other)


@triton.jit
def _sweep_kernel(in_ptr, out_ptr, src_in_ptr, src_out_ptr, dy_ptr, dx_ptr, K: tl.constexpr,
                  H, W, change_ptr, stopped_ptr, TRACK: tl.constexpr,
                  BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    go = tl.load(stopped_ptr) == 0  # a stopped iteration writes nothing
    valid = (i < H) & (j < W) & go
    off = plane * H * W
    src = in_ptr + off
    old = tl.load(src + i * W + j, mask=valid, other=0.0)
    best = old
    for k in range(0, K):
        dy = tl.load(dy_ptr + k)
        dx = tl.load(dx_ptr + k)
        a = _load_shifted(src, i + dy, j + dx, H, W, valid, 0.0)
        b = _load_shifted(src, i - dy, j - dx, H, W, valid, 0.0)
        m = tl.where(b < a, b, a)
        best = tl.where(m > best, m, best)
    tl.store(out_ptr + off + i * W + j, best, mask=valid)
    change = tl.where(valid, (best - old).to(tl.float64), 0.0)
    tl.store(change_ptr + pid, tl.max(tl.max(change, axis=1), axis=0))
    if TRACK:
        sources = src_in_ptr + off
        new_src = tl.load(sources + i * W + j, mask=valid, other=-1)
        pending = valid & (best > old)
        # row-major order of D: n_0 .. n_{K-1}, then -n_{K-1} .. -n_0
        for k in range(0, K):
            dy = tl.load(dy_ptr + k)
            dx = tl.load(dx_ptr + k)
            holder = _load_shifted(src, i + dy, j + dx, H, W, valid, 0.0)
            partner = _load_shifted(src, i - dy, j - dx, H, W, valid, 0.0)
            hit = pending & (holder == best) & (partner >= best)
            new_src = tl.where(hit, _load_shifted(sources, i + dy, j + dx, H, W, hit, -1), new_src)
            pending = pending & (hit == 0)
        for kk in range(0, K):
            k = K - 1 - kk
            dy = 0 - tl.load(dy_ptr + k)
            dx = 0 - tl.load(dx_ptr + k)
            holder = _load_shifted(src, i + dy, j + dx, H, W, valid, 0.0)
            partner = _load_shifted(src, i - dy, j - dx, H, W, valid, 0.0)
            hit = pending & (holder == best) & (partner >= best)
            new_src = tl.where(hit, _load_shifted(sources, i + dy, j + dx, H, W, hit, -1), new_src)
            pending = pending & (hit == 0)
        tl.store(src_out_ptr + off + i * W + j, new_src, mask=valid)


@triton.jit
def _segment_sum_kernel(keys_ptr, grad_ptr, out_ptr, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """keys sorted (stably); each run of equal keys sums its grads in order into out[key]."""
    # int64: B*C*H*W can reach 2^31 (an int32 pos would wrap negative and still pass pos < N)
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = pos < N
    key = tl.load(keys_ptr + pos, mask=inside, other=-2)
    prev = tl.load(keys_ptr + pos - 1, mask=inside & (pos > 0), other=-3)
    head = inside & (key != prev)
    acc = tl.zeros([BLOCK], dtype=ACC) + tl.load(grad_ptr + pos, mask=head, other=0.0).to(ACC)
    nxt = pos + 1
    active = head & (nxt < N)
    active = active & (tl.load(keys_ptr + nxt, mask=active, other=-2) == key)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        acc += tl.load(grad_ptr + nxt, mask=active, other=0.0).to(ACC)
        nxt += 1
        active = active & (nxt < N)
        active = active & (tl.load(keys_ptr + nxt, mask=active, other=-2) == key)
    tl.store(out_ptr + key, acc.to(out_ptr.dtype.element_ty), mask=head)


def _value_checks_on(t: torch.Tensor) -> bool:
    """Value checks need a host sync on CUDA: run them as geokernels.set_checks says."""
    mode = get_checks()
    return mode == "always" or (mode == "cpu" and t.device.type == "cpu")


def _pair_offsets(radius: float, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The K pair offsets n_k (negative half of D(r), row-major) as int32 tensors."""
    half = [o for o in midpoint_offsets(radius) if o < (0, 0)]
    dy = torch.tensor([o[0] for o in half] or [0], dtype=torch.int32, device=device)
    dx = torch.tensor([o[1] for o in half] or [0], dtype=torch.int32, device=device)
    return dy, dx, len(half)


@torch.library.custom_op("geokernels_triton::midpoint_convexify_forward", mutates_args=())
def midpoint_convexify_forward(u: torch.Tensor, radius: float, max_iters: int, tol: float,
                               mode: str, track_sources: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if mode not in _ops.MIDPOINT_MODES:
        raise ValueError(f"mode must be one of {_ops.MIDPOINT_MODES}, got {mode!r}")
    B, C, H, W = u.shape
    dev = u.device
    bufs = [u.contiguous().clone(), torch.empty((B, C, H, W), dtype=u.dtype, device=dev)]
    srcs = [None, None]
    if track_sources:
        srcs[0] = torch.arange(H * W, device=dev).view(1, 1, H, W).expand(B, C, H, W).contiguous()
        srcs[1] = torch.empty_like(srcs[0])
    dy, dx, K = _pair_offsets(radius, dev)
    grid = tile_grid(u, BLOCK_H, BLOCK_W)
    change = torch.zeros(grid[0], dtype=torch.float64, device=dev)
    stopped = torch.zeros(1, dtype=torch.int64, device=dev)
    sweeps = torch.zeros((), dtype=torch.int64, device=dev)
    with device_guard(u):
        for s in range(1, max_iters + 1):
            a, b = (s - 1) % 2, s % 2
            _sweep_kernel[grid](bufs[a], bufs[b], srcs[a] if track_sources else bufs[a],
                                srcs[b] if track_sources else bufs[b], dy, dx, K, H, W, change,
                                stopped, TRACK=track_sources, BH=BLOCK_H, BW=BLOCK_W)
            sweeps += 1 - stopped[0]
            stopped |= (change.max() <= tol).to(torch.int64)
            if s % SYNC_EVERY == 0 and bool(stopped.item()):
                break
    even = (sweeps % 2) == 0
    out = torch.where(even, bufs[0], bufs[1])
    sources = (torch.where(even, srcs[0], srcs[1]) if track_sources
               else torch.empty(0, dtype=torch.int64, device=dev))
    return out, sources, sweeps


midpoint_convexify_forward.register_fake(_ops.forward_fake)


@torch.library.custom_op("geokernels_triton::midpoint_convexify_backward", mutates_args=())
def midpoint_convexify_backward(grad: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    if sources.shape != grad.shape:
        raise ValueError(f"sources must have the shape of grad {tuple(grad.shape)}, got "
                         f"{tuple(sources.shape)} (was the forward run with track_sources=True?)")
    B, C, H, W = grad.shape
    n, planes = H * W, B * C
    src = sources.reshape(planes, n)
    in_range = (src >= 0) & (src < n)
    if _value_checks_on(grad) and bool(((src < -1) | (src >= n)).any()):
        raise ValueError("sources must hold flat pixel indices in [-1, H*W), got an out-of-range value")
    # gradients routed outside the image (source -1) land in a sentinel slot and are dropped;
    # so would out-of-range indices when value checks are off (never an out-of-bounds write)
    sentinel = planes * n
    keys = torch.where(in_range, src + torch.arange(planes, device=grad.device).view(planes, 1) * n,
                       sentinel).reshape(-1)
    sorted_keys, order = torch.sort(keys, stable=True)
    grad_sorted = grad.reshape(-1)[order].contiguous()
    out = torch.zeros(planes * n + 1, dtype=grad.dtype, device=grad.device)
    with device_guard(grad):
        _segment_sum_kernel[(triton.cdiv(keys.numel(), BLOCK_SEGMENTS),)](
            sorted_keys, grad_sorted, out, keys.numel(), BLOCK=BLOCK_SEGMENTS,
            ACC=compute_dtype(grad.dtype))
    return out[:-1].view(B, C, H, W)


midpoint_convexify_backward.register_fake(_ops.backward_fake)

_bw, _ctx = _ops.make_autograd(midpoint_convexify_backward)
midpoint_convexify_forward.register_autograd(_bw, setup_context=_ctx)
_bw2, _ctx2 = _ops.make_double_backward()
midpoint_convexify_backward.register_autograd(_bw2, setup_context=_ctx2)
