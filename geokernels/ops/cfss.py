"""Unrolled CFSS iterations (soft threshold dynamics with the contour-flow constraint, SPEC.md
2.4): public API, checkpoint policy, fake kernels and autograd.

The C++/CUDA kernels are ``torch.ops.geokernels.cfss_forward/backward``. The forward fuses the
Gaussian smoothing, the dual update, the divergence and the sigmoid of an iteration in one pass;
the backward is a hand-written reverse sweep (no autograd graph over the loop) that returns the
gradients w.r.t. o, T and the scalars eps, tau, lam and sigma.

Memory/time trade-off of ``checkpoint`` (per image, in units of one H x W plane; an autograd
graph over the reference loop holds about 5 planes per iteration, 270 for 50 iterations):

* ``"store"``: keep the state (u, q) of every iteration: 2 * iters planes, fastest backward.
* ``"recompute"``: keep nothing in the forward; the backward bisects the iterations (replay to
  the middle, reverse the second half, then the first) with ceil(log2 iters) + 1 states:
  14 planes for 50 iterations, 16 for 100 (+ ~6 for the gradients and adjoints), independent of
  the batch layout; costs about log2(iters) / 2 extra forward passes (for 50 iterations forward
  + backward takes ~1.5-2x the time of "store").
* an int k >= 1: checkpoint every k iterations and replay one k-iteration segment at a time:
  2 * (iters / k + k) planes for one extra forward pass (k = 1 is "store").
* ``"auto"`` (default): "store" while the stored states stay under
  ``CHECKPOINT_AUTO_BUDGET_BYTES`` (256 MiB), "recompute" above.
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch

from geokernels import _extension
from geokernels._backend import register_op, resolve
from geokernels._checks import values_checked
from geokernels.ops._autocast import float32_under_autocast
from geokernels.ops._validate import check_image, check_int, refuse_double_backward
from geokernels.ops.contour_flow import check_flow_shape, check_values
from geokernels.reference import contour_flow as _ref

register_op("cfss_iterate", ("cpu", "cuda", "triton"))

CHECKPOINT_MODES = ("auto", "store", "recompute")
CHECKPOINT_AUTO_BUDGET_BYTES = 256 * 2**20
CUDA_MAX_HALFSIZE = 16  # the CUDA kernels stage a (tile + 2 * halfsize)^2 window in shared memory
# every backend: the kernels index the (2 * halfsize + 1)-tap Gaussian with 32-bit ints, and a
# window 2049 pixels wide already covers any image the kernels are meant for (taps that fall
# outside the image see zeros, so a wider one changes nothing but the cost)
MAX_HALFSIZE = 1024


def set_cuda_steps_per_launch(steps: int | None) -> None:
    """Testing aid: force the CUDA forward to run ``steps`` iterations per launch (None: auto)."""
    if steps is None:
        os.environ.pop("GEOKERNELS_CFSS_STEPS_PER_LAUNCH", None)
    else:
        os.environ["GEOKERNELS_CFSS_STEPS_PER_LAUNCH"] = str(int(steps))


def num_saved_states(iters: int, every: int) -> int:
    """States kept by the forward for the backward: t = k, 2k, ... <= iters - 1 (none for the
    bisection schedule, k = 0)."""
    return (iters - 1) // every if iters >= 1 and every >= 1 else 0


def checkpoint_interval(checkpoint, iters: int, numel: int, itemsize: int) -> int:
    """The k of ``checkpoint`` (see the module docstring); 0 = the bisection schedule."""
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, (str, Integral)):
        raise TypeError(f"checkpoint must be one of {CHECKPOINT_MODES} or an int >= 1, "
                        f"got {type(checkpoint).__name__}")
    if isinstance(checkpoint, Integral):
        if checkpoint < 1:
            raise ValueError(f"checkpoint must be >= 1 when an int, got {checkpoint}")
        return int(checkpoint)
    if checkpoint not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES} or an int >= 1, got {checkpoint!r}")
    if checkpoint == "auto":
        stored = 2 * max(iters - 1, 0) * numel * itemsize
        checkpoint = "store" if stored <= CHECKPOINT_AUTO_BUDGET_BYTES else "recompute"
    return 1 if checkpoint == "store" else 0


def _check_scalar(value, name: str, positive: bool):
    """A finite real, or a one-element real tensor (kept as a tensor: it may require grad)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} must be a real number or a one-element floating tensor, "
                            f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        if values_checked(value):
            v = float(value.detach().reshape(()))
            if not math.isfinite(v) or (positive and v <= 0):
                raise ValueError(f"{name} must be {'> 0' if positive else 'finite'}, got {v}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    # under torch.compile a float argument may be symbolic (dynamic=True, or a value that
    # changed between calls): math.isfinite cannot be traced, so only eager calls check it
    if (not torch.compiler.is_compiling() and not math.isfinite(v)) or (positive and v <= 0):
        raise ValueError(f"{name} must be {'> 0' if positive else 'finite'}, got {value!r}")
    return v


def _params_tensor(values, like: torch.Tensor) -> torch.Tensor:
    parts = [v.to(device=like.device, dtype=like.dtype) if isinstance(v, torch.Tensor)
             else torch.tensor(v, dtype=like.dtype, device=like.device) for v in values]
    return torch.stack(parts)


@float32_under_autocast
def cfss_iterate(
    o: torch.Tensor,
    T: torch.Tensor,
    iters: int = 50,
    eps=1.0,
    tau=1.0,
    lam=1.0,
    sigma=5.0,
    halfsize: int = 2,
    q_nonneg: bool = False,
    checkpoint="auto",
    backend: str = "auto",
) -> torch.Tensor:
    """Unrolled CFSS iterations (SPEC.md 2.4); returns the logits z of the last iteration.

    Args:
        o: (B, C, H, W) logits, float32/float64 (the SPEC's C = 1; classes are independent).
        T: (B, 2C, H, W) unit vector field; channels (2c, 2c+1) pair with the (row, column)
            forward differences of class c.
        iters: number of iterations >= 0 (0 returns ``o / eps``).
        eps: sigmoid temperature (> 0); tau: dual step; lam: smoothing weight; sigma: Gaussian
            width (> 0). Each a real or a one-element tensor (differentiable).
        halfsize: the Gaussian has (2 halfsize + 1)^2 taps (0 <= halfsize <= 1024; <= 16 on
            the CUDA backend).
        q_nonneg: project the dual variable on q >= 0 (``relu``; inequality / star-shape variant).
        checkpoint: "auto" | "store" | "recompute" | int k (see the module docstring).
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (the literal reference loop).

    Returns:
        z (B, C, H, W), dtype of ``o``. Differentiable w.r.t. o, T, eps, tau, lam and sigma.
    """
    check_image(o, "o", allow_low_precision_cuda=False, values=False)
    check_image(T, "T", allow_low_precision_cuda=False, values=False)
    check_flow_shape(o, T, "o", "T")
    check_values(o, "o")
    check_values(T, "T")
    iters = check_int(iters, "iters", min_value=0)
    halfsize = check_int(halfsize, "halfsize", min_value=0)
    if halfsize > MAX_HALFSIZE:
        raise ValueError(f"halfsize must be <= {MAX_HALFSIZE}, got {halfsize}")
    if not isinstance(q_nonneg, bool):
        raise TypeError(f"q_nonneg must be a bool, got {type(q_nonneg).__name__}")
    eps = _check_scalar(eps, "eps", positive=True)
    tau = _check_scalar(tau, "tau", positive=False)
    lam = _check_scalar(lam, "lam", positive=False)
    sigma = _check_scalar(sigma, "sigma", positive=True)
    every = checkpoint_interval(checkpoint, iters, o.numel(), o.element_size())
    be = resolve("cfss_iterate", backend, o)
    T = T.to(o.dtype)
    if be == "torch":
        return _ref.cfss_iterate(o, T, iters, eps, tau, lam, sigma, halfsize, q_nonneg)
    if be == "cuda" and halfsize > CUDA_MAX_HALFSIZE:
        raise ValueError(f"halfsize must be <= {CUDA_MAX_HALFSIZE} on the CUDA backend, got "
                         f"{halfsize}; use backend='torch' for wider kernels")
    params = _params_tensor((eps, tau, lam, sigma), o)
    save = torch.is_grad_enabled() and (o.requires_grad or T.requires_grad or params.requires_grad)
    if be == "triton":
        from geokernels.triton import cfss as _triton_cfss

        z, _ = _triton_cfss.cfss_forward(o, T, params, iters, halfsize, q_nonneg, every, save)
        return z
    z, _ = torch.ops.geokernels.cfss_forward(o, T, params, iters, halfsize, q_nonneg, every, save)
    return z


def _forward_fake(o, T, params, iters, halfsize, q_nonneg, checkpoint_every, save_states):
    n = num_saved_states(iters, checkpoint_every) if save_states else 0
    B, C, H, W = o.shape
    return (torch.empty_like(o, memory_format=torch.contiguous_format),
            o.new_empty((n, 2, B, C, H, W)))


def _backward_fake(grad_z, o, T, params, states, iters, halfsize, q_nonneg, checkpoint_every):
    return (torch.empty_like(o, memory_format=torch.contiguous_format),
            torch.empty_like(T, memory_format=torch.contiguous_format),
            torch.empty_like(params, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    o, T, params, iters, halfsize, q_nonneg, every, save = inputs
    _, states = output
    ctx.save_for_backward(o, T, params, states)
    ctx.args = (iters, halfsize, q_nonneg, every)
    ctx.mark_non_differentiable(states)
    ctx.set_materialize_grads(False)  # never build a zero gradient for the states


def _backward(ctx, grad_z, grad_states):
    refuse_double_backward("cfss_iterate")
    o, T, params, states = ctx.saved_tensors
    if grad_z is None:
        grad_z = torch.zeros_like(o)
    g_o, g_T, g_params = torch.ops.geokernels.cfss_backward(grad_z, o, T, params, states, *ctx.args)
    return g_o, g_T, g_params, None, None, None, None, None


if _extension.compiled():
    torch.library.register_fake("geokernels::cfss_forward")(_forward_fake)
    torch.library.register_fake("geokernels::cfss_backward")(_backward_fake)
    torch.library.register_autograd("geokernels::cfss_forward", _backward, setup_context=_setup_context)
