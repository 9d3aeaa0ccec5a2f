"""Argument validation shared by the public ops: errors name the offending argument."""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from geokernels._checks import check_finite

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_image(t, name: str, *, channels: int | None = None, allow_low_precision_cuda: bool = True,
                values: bool = True) -> None:
    """``t`` must be a non-empty floating (B, C, H, W) tensor; float16/bfloat16 only on CUDA."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if channels is not None and t.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(t.shape)}")
    if t.dtype in _LOW_PRECISION and not (allow_low_precision_cuda and t.device.type == "cuda"):
        where = ("supported on CUDA only" if allow_low_precision_cuda else
                 "not supported by this op (its iterations need float32 or float64 state)")
        raise TypeError(f"{name} has dtype {t.dtype}, which is {where}; use float32 or float64")
    if values:
        check_finite(t, name)


def check_maps(t, name: str, *, ranks=(3,), values: bool = True) -> None:
    """``t`` must be a non-empty real floating tensor of one of ``ranks`` ((B, H, W) maps)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() not in ranks:
        want = " or ".join({2: "(H, W)", 3: "(B, H, W)", 4: "(B, C, H, W)"}.get(r, f"rank {r}")
                           for r in ranks)
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if values:
        check_finite(t, name)


def check_choice(value, name: str, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_real(value, name: str, *, min_value: float | None = None, min_inclusive: bool = True,
               max_value: float | None = None) -> float:
    """A finite real scalar within [min, max]; returns it as a Python float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    # under torch.compile a float argument may be symbolic (dynamic=True, or a value that
    # changed between calls): math.isfinite cannot be traced, so only eager calls check it
    if not torch.compiler.is_compiling() and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if min_value is not None and (v < min_value or (not min_inclusive and v == min_value)):
        op = ">=" if min_inclusive else ">"
        raise ValueError(f"{name} must be {op} {min_value}, got {value!r}")
    if max_value is not None and v > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value!r}")
    return v


def check_int(value, name: str, *, min_value: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return value


REDUCTIONS = ("mean", "sum", "none")


def refuse_double_backward(op: str) -> None:
    """Call first in the autograd backward of a fused op whose backward kernel has no derivative
    of its own (qc2/qc1 losses, contour_flow_loss, cfss_iterate).

    The autograd engine runs a backward with grad mode on exactly when the caller asked for
    ``create_graph=True`` (Hessian-vector products, gradient penalties). The closed-form backward
    kernels are not differentiable: PyTorch would hand back first-order gradients detached from
    the graph, so every second derivative would silently be zero. Refuse instead.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True: Hessian-vector products, gradient "
            "penalties) is not supported by the fused backends (cpu/cuda/triton), whose "
            "closed-form backward has no derivative; use backend='torch' (the reference, "
            "which supports it) to differentiate the gradient")
