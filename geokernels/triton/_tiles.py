"""Pieces shared by the 2-D tiled Triton kernels: one program per (BH, BW) tile of one (b, c)
plane of a contiguous (B, C, H, W) tensor, programs numbered plane-major then row-major."""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def tile_coords(pid, H, W, BH: tl.constexpr, BW: tl.constexpr):
    """Program ``pid``'s plane (int64, so plane * H * W cannot overflow), rows (BH, 1) and
    columns (1, BW); rows/columns past H/W are the caller's to mask."""
    tiles_w = tl.cdiv(W, BW)
    tiles = tl.cdiv(H, BH) * tiles_w
    plane = pid // tiles
    rem = pid % tiles
    i = (rem // tiles_w) * BH + tl.arange(0, BH)[:, None]
    j = (rem % tiles_w) * BW + tl.arange(0, BW)[None, :]
    return plane.to(tl.int64), i, j


def tile_grid(x: torch.Tensor, block_h: int, block_w: int) -> tuple[int]:
    """Launch grid of ``tile_coords`` kernels over the (B, C, H, W) tensor ``x``."""
    B, C, H, W = x.shape
    return (B * C * triton.cdiv(H, block_h) * triton.cdiv(W, block_w),)


def compute_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64 tensors, float32 otherwise (for
    float16/bfloat16 inputs too)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(dtype: torch.dtype):
    """:func:`compute_torch_dtype` as a Triton dtype (the kernels' ``CDT`` argument)."""
    return tl.float64 if compute_torch_dtype(dtype) == torch.float64 else tl.float32


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current for the launches in the block: Triton launches on the current
    device and stream, not the tensors' (a tensor on cuda:1 while cuda:0 is current would be
    read by a kernel on the wrong GPU). A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def scalar_args(like: torch.Tensor, values) -> torch.Tensor:
    """Float kernel parameters as a 1-D tensor in ``like``'s compute dtype, filled on the device
    (no host-device copy or sync; fine under CUDA graph capture). Compiled Triton passes a Python
    float argument as float32 (the interpreter keeps the double): float64 runs would use rounded
    constants."""
    out = torch.empty(len(values), dtype=compute_torch_dtype(like.dtype), device=like.device)
    for k, v in enumerate(values):
        out[k] = v
    return out


@triton.jit
def sqrt_ieee(x):
    # correctly rounded sqrt, as sqrtf/sqrt in the CPU/CUDA kernels. fp32 tl.sqrt compiles to
    # sqrt.approx.ftz.f32, which flushes a subnormal argument to 0: a norm |a| < 1.1e-19 becomes
    # 0 (qc2 at eps = 0: grad_g / g = inf/NaN; contour flow at eps < |a|: the cosine collapses).
    # tl.sqrt_rn is sqrt.rn.f32 (no flush) but takes fp32 only, and fp64 tl.sqrt is already
    # sqrt.rn.f64. The interpreter computes both with numpy.
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r
