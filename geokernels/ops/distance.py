"""Exact Euclidean distance transform and the contour-flow field: public API and fake kernels
(SPEC.md 2.1-2.2).

The C++/CUDA kernels are ``torch.ops.geokernels.distance_transform`` and
``torch.ops.geokernels.contour_flow_field``. Both are piecewise constant in the mask, so they
carry no gradient (a mask that requires grad is detached).
"""
from __future__ import annotations

import torch

from geokernels import _extension
from geokernels._backend import register_op, resolve
from geokernels._checks import check_finite, values_checked
from geokernels.ops._autocast import float32_under_autocast
from geokernels.ops._validate import check_choice, check_real
from geokernels.reference import distance as _ref

NO_BACKGROUND = _ref.NO_BACKGROUND
STENCILS = _ref.STENCILS
OUTPUT_DTYPES = (torch.float32, torch.float64)

register_op("distance_transform", ("cpu", "cuda"))
register_op("contour_flow_field", ("cpu", "cuda"))


# mask dtypes the C++/CUDA kernels dispatch on (AT_DISPATCH_ALL_TYPES_AND3(Bool, Half, BFloat16) in
# csrc/{cpu,cuda}/distance.*): passed to them as they are, without a copy
_KERNEL_MASK_DTYPES = frozenset({
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64})
# the wider unsigned ints have no kernel case; the kernels only test `!= 0`, so mask.ne(0) (bool:
# the kernels' cheapest input) is exact. Converted just before a kernel call, after the checks.
_WIDE_UNSIGNED = frozenset({torch.uint16, torch.uint32, torch.uint64})
# float8 masks: most CPU ops (isfinite, >) are missing for them, and every float8 value (NaN and
# Inf included) is exact in float32, so they become float32 before the checks: NaN/Inf raise
# exactly as for float32 masks, and the kernels get a dtype they dispatch on
_FLOAT8 = frozenset(getattr(torch, n) for n in (
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, n))


def _check_mask(mask, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be a real or bool tensor, got dtype {mask.dtype}")
    dt = mask.dtype
    if dt not in _KERNEL_MASK_DTYPES and dt not in _WIDE_UNSIGNED and dt not in _FLOAT8:
        # quantized, packed (float4_e2m1fn_x2, bits*) and sub-byte (int1-7, uint1-7) dtypes: no
        # elementwise ops to read them with
        raise TypeError(
            f"{name} must be a bool, integer or floating-point tensor, got dtype {dt}")
    if mask.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(mask.shape)}")
    mask = mask.detach()
    if dt in _FLOAT8:
        mask = mask.float()
    if mask.is_floating_point():
        check_finite(mask, name)
    return mask


def _kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` in a dtype the C++/CUDA kernels dispatch on, with the same zero pixels."""
    return mask if mask.dtype in _KERNEL_MASK_DTYPES else mask.ne(0)


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


@float32_under_autocast
def distance_transform(
    mask: torch.Tensor,
    *,
    invert: bool = False,
    dtype: torch.dtype = torch.float32,
    no_background: str = "inf",
    backend: str = "auto",
) -> torch.Tensor:
    """Exact Euclidean distance of every pixel to the nearest zero pixel (SPEC.md 2.1-2.2).

    Equal, pixel for pixel, to ``scipy.ndimage.distance_transform_edt`` applied to each (b, c)
    plane (the float32 result is scipy's float64 value rounded once). Separable passes: column
    distances, then the lower envelope of parabolas along rows (Meijster / Felzenszwalb-
    Huttenlocher) in integer arithmetic.

    Args:
        mask: (B, C, H, W), bool or any real dtype; nonzero = foreground. Each plane is one image.
            NaN/Inf raise ValueError (whenever value checks run). The kernels read the common
            dtypes in place; uint16/uint32/uint64 and float8 masks are first converted exactly
            (to bool, resp. float32).
        invert: measure the distance to the nearest NONZERO pixel instead (= EDT(1 - mask) for a
            binary mask, without building 1 - mask).
        dtype: torch.float32 (default) or torch.float64.
        no_background: value of a plane that has no zero pixel at all (no distance exists):
            "inf" (default) fills it with +inf; "scipy" reproduces scipy, which measures to the
            virtual pixel (-1, 0) above the top-left corner: sqrt((i + 1)^2 + j^2).
        backend: "auto" | "cuda" | "cpu" | "torch" (the pure-PyTorch reference).

    Returns:
        (B, C, H, W) distances in ``dtype``; zero pixels (nonzero with invert) hold 0.
    """
    mask = _check_mask(mask)
    if not isinstance(invert, bool):
        raise TypeError(f"invert must be a bool, got {type(invert).__name__}")
    dtype = _check_dtype(dtype)
    check_choice(no_background, "no_background", NO_BACKGROUND)
    be = resolve("distance_transform", backend, mask)
    if be == "torch":
        return _ref.distance_transform(mask, invert=invert, dtype=dtype, no_background=no_background)
    return torch.ops.geokernels.distance_transform(
        _kernel_mask(mask), invert, dtype == torch.float64, no_background)


@float32_under_autocast
def contour_flow_field(
    mask: torch.Tensor,
    stencil: str = "forward",
    smooth_sigma: float = 0.0,
    *,
    threshold: float | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Ground-truth contour flow of a binary mask: unit tangents of the level lines (SPEC.md 2.2).

    With the defaults, per channel::

        d_in = EDT(m);  d_out = EDT(1 - m)
        G = grad_valid(d_in) * m + grad_valid(-d_out) * (1 - m)     (forward differences, SPEC 2.1)
        N = G / max(|G|, 1e-20);  F = (-N1, N0)

    Every border pixel gets F = 0 ("valid" differences), and so does every pixel of a constant
    plane (all foreground or all background: no contour). Exact: the fused kernels reproduce the
    reference bit for bit up to the sign of zeros.

    Args:
        mask: (B, C, H, W) binary mask: bool, or 0/1 values of any real dtype. Non-binary values
            raise ValueError (checked whenever value checks run: on CPU tensors by default, on
            CUDA with ``geokernels.set_checks("always")``; unchecked, nonzero = foreground).
            Pass ``threshold`` to binarise soft masks instead. Dtypes as for
            ``distance_transform`` (uint16/uint32/uint64 and float8 are converted exactly).
        stencil: "forward" (SPEC default) or "central" ((f[i+1] - f[i-1]) / 2; ablation).
        smooth_sigma: 0 (SPEC default) or > 0: the gradient of the Gaussian-smoothed signed
            distance ``gaussian(d_in - d_out, smooth_sigma)`` (scipy gaussian_filter semantics,
            mode="nearest", truncate=4) replaces G (ablation; composed from the EDT kernel).
        threshold: if given, the mask is ``mask > threshold`` (documented thresholding of soft
            masks); None (default) requires a binary mask.
        dtype: torch.float32 (default) or torch.float64.
        backend: "auto" | "cuda" | "cpu" | "torch" (the pure-PyTorch reference).

    Returns:
        (B, 2C, H, W) in ``dtype``; channels (2c, 2c+1) are (F0, F1) of mask channel c, F0 pairing
        with the row difference and F1 with the column difference (the layout
        ``contour_flow_loss`` and ``cfss_iterate`` take).
    """
    mask = _check_mask(mask)
    check_choice(stencil, "stencil", STENCILS)
    smooth_sigma = check_real(smooth_sigma, "smooth_sigma", min_value=0.0)
    dtype = _check_dtype(dtype)
    if threshold is not None:
        threshold = check_real(threshold, "threshold")
        mask = mask > threshold
    elif mask.dtype != torch.bool and values_checked(mask):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                "mask must be binary (0/1 or bool) for contour_flow_field; got other values. "
                "Pass threshold=0.5 (say) to binarise a soft mask")
    be = resolve("contour_flow_field", backend, mask)
    if be == "torch":
        return _ref.contour_flow_field(mask, stencil, smooth_sigma, dtype)
    mask = _kernel_mask(mask)
    if smooth_sigma > 0:
        def edt(m, invert, dt):
            return torch.ops.geokernels.distance_transform(m, invert, dt == torch.float64, "inf")

        return _ref.contour_flow_field(mask, stencil, smooth_sigma, dtype, edt=edt)
    return torch.ops.geokernels.contour_flow_field(mask, stencil == "central", dtype == torch.float64)


def _distance_transform_fake(mask, invert, float64, no_background):
    return mask.new_empty(mask.shape, dtype=torch.float64 if float64 else torch.float32)


def _contour_flow_field_fake(mask, central, float64):
    B, C, H, W = mask.shape
    return mask.new_empty((B, 2 * C, H, W), dtype=torch.float64 if float64 else torch.float32)


if _extension.compiled():
    _extension.require_ops("distance_transform", "contour_flow_field")
    torch.library.register_fake("geokernels::distance_transform")(_distance_transform_fake)
    torch.library.register_fake("geokernels::contour_flow_field")(_contour_flow_field_fake)
