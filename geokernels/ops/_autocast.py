"""The autocast policy of every public op: under ``torch.autocast`` the ops compute in float32.

Our ops are losses, iterative solvers and reductions (sums of squares over many pixels, unrolled
Adam/CFSS loops, distance fields). PyTorch's own autocast runs that kind of op (``mse_loss``,
``binary_cross_entropy_with_logits``, ``softplus``, ``norm``, ...) in float32, and so do we:

* inside an enabled ``torch.autocast(device_type)`` region (CPU or CUDA), float16/bfloat16
  tensor arguments are cast to float32 before validation, the op runs with autocast disabled
  (so the reference backend's torch calls are not re-cast either), and the result is float32;
  gradients flow back through the cast in the argument's own dtype;
* float32/float64 arguments are untouched: autocast never changes an op's numbers;
* outside autocast nothing changes: an explicit float16/bfloat16 tensor runs the low-precision
  CUDA kernels (float32 accumulation) and is a TypeError on CPU, as the ops document.

``flow_mismatch`` calls a user model: it upcasts its image argument the same way but leaves the
caller's autocast on for the model calls (a bf16 model under autocast stays bf16); the
velocities are then cast to float32 before the fused reduction.
"""
from __future__ import annotations

import functools

import torch

_LOW = (torch.float16, torch.bfloat16)
_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_device(args, kwargs) -> str | None:
    """The device type of the first tensor argument when autocast is enabled there, else None."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            dev = a.device.type
            if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
                return dev
            return None
    return None


def upcast(a):
    """float16/bfloat16 tensors -> float32 (differentiable); anything else unchanged."""
    if isinstance(a, torch.Tensor) and a.dtype in _LOW:
        return a.float()
    return a


def float32_under_autocast(fn):
    """Decorator: run ``fn`` in float32 with autocast disabled when called inside autocast."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = autocast_device(args, kwargs)
        if dev is None:
            return fn(*args, **kwargs)
        args = tuple(upcast(a) for a in args)
        kwargs = {k: upcast(v) for k, v in kwargs.items()}
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
