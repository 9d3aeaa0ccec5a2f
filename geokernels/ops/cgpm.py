"""CGPM, the convex gradient projection module (SPEC.md 1.5): public API.

The fused backends run the unrolled Adam loop without an autograd graph: per step one kernel
pass computes dL/do in closed form (fidelity + weight * qc{2,1} gradient through the sigmoid,
means over the whole batch as published) and updates o, m, v in place
(``torch.ops.geokernels.cgpm_steps`` on CPU/CUDA, ``geokernels.triton.cgpm`` on Triton).

``backprop_to_backbone=True`` differentiates the result w.r.t. the logits through every step.
The forward still runs fused; the backward walks the steps in reverse, rebuilding each step's
state from checkpoints (every ~sqrt(steps) steps, recomputed with the fused kernel) and taking
the vector-Jacobian product of one Adam step with the reference losses' double backward. Memory
is O(sqrt(steps) * B*C*H*W) plus one step's autograd graph.
"""
from __future__ import annotations

import math

import torch

from geokernels import _extension
from geokernels._backend import register_op, resolve
from geokernels.ops._autocast import float32_under_autocast
from geokernels.ops._validate import (check_choice, check_image, check_int, check_real,
                                      refuse_double_backward)
from geokernels.ops.qc_loss import QC2_ACTIVATIONS, check_window
from geokernels.reference import dconvex as _ref

METHODS = ("c2", "c1")
# loss_kwargs each method accepts, with their defaults (those of qc2_loss / qc1_loss)
C2_LOSS_DEFAULTS = dict(margin=1e-3, beta=1.0, eps=1e-8, grad_threshold=1e-5, activation="softplus")
C1_LOSS_DEFAULTS = dict(window=7)

register_op("cgpm", ("cpu", "cuda", "triton"))


def _loss_config(method: str, loss_kwargs: dict) -> dict:
    """All loss parameters (defaults filled in), validated; TypeError for unknown names."""
    defaults = C2_LOSS_DEFAULTS if method == "c2" else C1_LOSS_DEFAULTS
    unknown = sorted(set(loss_kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"cgpm got unexpected loss argument(s) {unknown} for method={method!r}; "
                        f"it accepts {sorted(defaults)}")
    cfg = dict(defaults, **loss_kwargs)
    if method == "c2":
        cfg["margin"] = check_real(cfg["margin"], "margin")
        cfg["beta"] = check_real(cfg["beta"], "beta", min_value=0.0, min_inclusive=False)
        cfg["eps"] = check_real(cfg["eps"], "eps", min_value=0.0)
        cfg["grad_threshold"] = check_real(cfg["grad_threshold"], "grad_threshold", min_value=0.0)
        check_choice(cfg["activation"], "activation", QC2_ACTIVATIONS)
    else:
        cfg["window"] = check_window(cfg["window"])
    return cfg


def _check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = check_real(betas[0], "betas[0]", min_value=0.0)
    b2 = check_real(betas[1], "betas[1]", min_value=0.0)
    if b1 >= 1.0 or b2 >= 1.0:
        raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)!r}")
    return b1, b2


class _Settings:
    """Everything a fused run needs besides the tensors (hashable-free plain record)."""

    def __init__(self, lr, weight, betas, adam_eps, method, loss_cfg):
        self.lr, self.weight, self.betas, self.adam_eps = lr, weight, betas, adam_eps
        self.method, self.loss_cfg = method, loss_cfg

    @classmethod
    def from_op_args(cls, lr, beta1, beta2, adam_eps, weight, order, margin, beta, eps,
                     grad_threshold, activation, window):
        if order == 2:
            method, cfg = "c2", dict(margin=margin, beta=beta, eps=eps,
                                     grad_threshold=grad_threshold, activation=activation)
        else:
            method, cfg = "c1", dict(window=window)
        return cls(lr, weight, (beta1, beta2), adam_eps, method, cfg)

    def op_args(self):
        c = C2_LOSS_DEFAULTS | C1_LOSS_DEFAULTS | self.loss_cfg
        return (self.lr, self.betas[0], self.betas[1], self.adam_eps, self.weight,
                2 if self.method == "c2" else 1, c["margin"], c["beta"], c["eps"],
                c["grad_threshold"], c["activation"], c["window"])


def _run_steps(backend: str, o, m, v, u0, first_step: int, steps: int, settings: _Settings,
               return_history: bool):
    """Steps first_step+1 .. first_step+steps on a fused backend: (o, m, v, history)."""
    args = (o, m, v, u0, first_step, steps) + settings.op_args() + (return_history,)
    if backend == "triton":
        from geokernels.triton import cgpm as _triton_cgpm

        return _triton_cgpm.cgpm_steps(*args)
    return torch.ops.geokernels.cgpm_steps(*args)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Adam with eps = 1e-8 needs at least float32: half inputs are refined in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _step_vjp(o, m, v, u0, t, settings: _Settings, adj_o, adj_m, adj_v):
    """Adjoints of (o, m, v, u0) before step t, given those of (o, m, v) after it: one Adam step
    differentiated with the reference losses (their double backward)."""
    with torch.enable_grad():
        o = o.detach().requires_grad_()
        m = m.detach().requires_grad_()
        v = v.detach().requires_grad_()
        u0 = u0.detach().requires_grad_()
        loss = _ref.cgpm_loss(torch.sigmoid(o), u0, settings.method, settings.weight,
                              **settings.loss_cfg)
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
        o2, m2, v2 = _ref.cgpm_adam_step(o, m, v, g, t, settings.lr, settings.betas,
                                         settings.adam_eps)
        grads = torch.autograd.grad((o2, m2, v2), (o, m, v, u0), (adj_o, adj_m, adj_v),
                                    allow_unused=True)
    return tuple(torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, (o, m, v, u0)))


class _FusedUnroll(torch.autograd.Function):
    """o_T of the fused loop from (o_0, u0), differentiable in both (see the module docstring)."""

    @staticmethod
    def forward(ctx, o0, u0, steps, settings, backend, return_history):
        every = max(1, math.isqrt(max(steps - 1, 0)) + 1)  # checkpoint interval ~ sqrt(steps)
        o, m, v = o0.detach(), torch.zeros_like(o0), torch.zeros_like(o0)
        starts, saved, history = [], [], []
        t = 0
        while t < steps:
            n = min(every, steps - t)
            starts.append(t)
            saved += [o, m, v]
            o, m, v, h = _run_steps(backend, o, m, v, u0, t, n, settings, return_history)
            history.append(h)
            t += n
        ctx.save_for_backward(u0, *saved)
        ctx.starts, ctx.steps, ctx.settings, ctx.backend = starts, steps, settings, backend
        hist = torch.cat(history) if history else o0.new_zeros((0,))
        ctx.mark_non_differentiable(hist)
        return o.clone() if steps == 0 else o, hist

    @staticmethod
    def backward(ctx, adj_o, _adj_hist):
        # not @once_differentiable: its error fires only when a later backward reaches this
        # node, and torch.autograd.grad(..., inputs=...) of a Hessian-vector product does not,
        # so the second-order terms through the unroll were silently dropped
        refuse_double_backward("cgpm")
        u0, *saved = ctx.saved_tensors
        adj_o = torch.zeros_like(u0) if adj_o is None else adj_o
        # an opaque op (not traced by torch.compile: its body differentiates the reference step
        # with torch.autograd.grad, which dynamo cannot capture), so cgpm compiles fullgraph
        adj_o, adj_u0 = torch.ops.geokernels.cgpm_unroll_backward(
            adj_o, u0, saved, ctx.starts, ctx.steps, ctx.backend, *ctx.settings.op_args())
        return adj_o, adj_u0, None, None, None, None


@torch.library.custom_op("geokernels::cgpm_unroll_backward", mutates_args=())
def _unroll_backward(adj_o: torch.Tensor, u0: torch.Tensor, saved: list[torch.Tensor],
                     starts: list[int], steps: int, backend: str, lr: float, beta1: float,
                     beta2: float, adam_eps: float, weight: float, order: int, margin: float,
                     beta: float, eps: float, grad_threshold: float, activation: str,
                     window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoints (of o_0, of u0) of the fused unroll: segment by segment from the checkpoints
    ``saved`` = [o, m, v] at each of ``starts``, recomputing a segment's states with the fused
    kernel and stepping back through them with ``_step_vjp``."""
    settings = _Settings.from_op_args(lr, beta1, beta2, adam_eps, weight, order, margin, beta,
                                      eps, grad_threshold, activation, window)
    with _autograd_inside_op():
        return _unroll_adjoints(adj_o.clone(), u0, saved, starts, steps, backend, settings)


def _autograd_inside_op():
    """A custom op's kernel runs below the autograd dispatch keys (they are excluded from the
    thread-local dispatch state), so torch.autograd.grad would find no graph: lift that
    exclusion for the body (the dispatcher restores it on exit)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor",
                "ADInplaceOrView"):
        if hasattr(torch._C.DispatchKey, key):
            exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _unroll_adjoints(adj_o, u0, saved, starts, steps, backend, settings):
    adj_m = torch.zeros_like(u0)
    adj_v = torch.zeros_like(u0)
    adj_u0 = torch.zeros_like(u0)
    bounds = list(starts) + [steps]
    for seg in reversed(range(len(starts))):
        t0, t1 = bounds[seg], bounds[seg + 1]
        o, m, v = saved[3 * seg:3 * seg + 3]
        states = [(o, m, v)]
        for t in range(t0, t1 - 1):  # recompute the segment's states with the fused kernel
            o, m, v, _ = _run_steps(backend, o, m, v, u0, t, 1, settings, False)
            states.append((o, m, v))
        for t in reversed(range(t0, t1)):
            o, m, v = states[t - t0]
            adj_o, adj_m, adj_v, du0 = _step_vjp(o, m, v, u0, t + 1, settings,
                                                 adj_o, adj_m, adj_v)
            adj_u0 = adj_u0 + du0
    return adj_o, adj_u0


@_unroll_backward.register_fake
def _unroll_backward_fake(adj_o, u0, saved, starts, steps, backend, *settings):
    like = dict(memory_format=torch.contiguous_format)
    return torch.empty_like(u0, **like), torch.empty_like(u0, **like)


def _initial_u(backend: str, o0: torch.Tensor) -> torch.Tensor:
    """u0 = sigmoid(o0) rounded as the backend's step kernels round their iterates, so that
    relu(u0 - u) is exactly 0 where o has not moved (the Triton steps' sigmoid differs from
    torch.sigmoid by an ulp, which Adam turned into lr-sized steps on flat inputs);
    differentiable as torch.sigmoid."""
    s = torch.sigmoid(o0)
    if backend != "triton":
        return s
    from geokernels.triton import cgpm as _triton_cgpm

    k = _triton_cgpm.sigmoid(o0.detach())
    # k - s is exact (they are an ulp apart), so s + (k - s) is k bit for bit
    return s + (k - s).detach() if s.requires_grad else k


@float32_under_autocast
def cgpm(
    logits: torch.Tensor,
    steps: int = 100,
    lr: float = 1e-2,
    method: str = "c2",
    weight: float = 1.0,
    betas=(0.9, 0.999),
    adam_eps: float = 1e-8,
    return_history: bool = False,
    backprop_to_backbone: bool = False,
    backend: str = "auto",
    **loss_kwargs,
):
    """Convex gradient projection of raw segmentation logits onto quasi-concave masks
    (SPEC.md 1.5): ``steps`` Adam steps on ``o`` (the logits scaled per (b, c) by
    1 / (max |logits| + 1e-8)) minimising ``fidelity_loss(sigmoid(o), u0) + weight *
    qc{2|1}_loss(sigmoid(o))``, u0 = sigmoid(o_0), means over the whole batch (so a step depends
    on B*H*W, as published).

    Args:
        logits: (B, C, H, W) raw mask logits, float32/float64 (float16/bfloat16 on CUDA,
            refined in float32).
        steps: number of Adam steps, >= 0.
        lr: Adam step size, >= 0.
        method: "c2" (second-order loss qc2_loss, SPEC 1.2) or "c1" (qc1_loss, SPEC 1.3).
        weight: weight of the shape loss against the fidelity, >= 0.
        betas, adam_eps: Adam's (beta1, beta2) in [0, 1) and epsilon > 0.
        return_history: also return the (steps,) loss L at the start of each step.
        backprop_to_backbone: make the result differentiable w.r.t. ``logits`` through all the
            steps (u0 included). Otherwise the result is detached.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (the reference autograd loop).
        **loss_kwargs: for "c2": margin, beta, eps, grad_threshold, activation (qc2_loss);
            for "c1": window (qc1_loss).

    Returns:
        The refined probabilities sigmoid(o_T), (B, C, H, W) of the dtype of ``logits``, and
        with ``return_history`` also the (steps,) history tensor.
    """
    check_image(logits, "logits")
    steps = check_int(steps, "steps", min_value=0)
    lr = check_real(lr, "lr", min_value=0.0)
    check_choice(method, "method", METHODS)
    weight = check_real(weight, "weight", min_value=0.0)
    betas = _check_betas(betas)
    adam_eps = check_real(adam_eps, "adam_eps", min_value=0.0, min_inclusive=False)
    if not isinstance(return_history, bool):
        raise TypeError(f"return_history must be a bool, got {type(return_history).__name__}")
    if not isinstance(backprop_to_backbone, bool):
        raise TypeError(
            f"backprop_to_backbone must be a bool, got {type(backprop_to_backbone).__name__}")
    loss_cfg = _loss_config(method, loss_kwargs)
    be = resolve("cgpm", backend, logits)
    differentiate = backprop_to_backbone and torch.is_grad_enabled() and logits.requires_grad
    if be == "torch":
        return _ref.cgpm(logits, steps, lr, method, weight, betas, adam_eps, return_history,
                         differentiate, **loss_cfg)
    settings = _Settings(lr, weight, betas, adam_eps, method, loss_cfg)
    x = logits.to(_work_dtype(logits.dtype))
    if differentiate:
        o0 = _ref.cgpm_normalise(x)
        u0 = _initial_u(be, o0)
        o, hist = _FusedUnroll.apply(o0, u0, steps, settings, be, return_history)
        out = torch.sigmoid(o)
    else:
        with torch.no_grad():
            o0 = _ref.cgpm_normalise(x.detach())
            u0 = _initial_u(be, o0)
            zeros = torch.zeros_like(o0)
            o, _, _, hist = _run_steps(be, o0, zeros, zeros, u0, 0, steps, settings,
                                       return_history)
            out = torch.sigmoid(o)
    out = out.to(logits.dtype)
    if return_history:
        return out, hist.to(logits.dtype)
    return out


def _cgpm_steps_fake(o, m, v, u0, first_step, steps, lr, beta1, beta2, adam_eps, weight, order,
                     margin, beta, eps, grad_threshold, activation, window, return_history):
    like = dict(memory_format=torch.contiguous_format)
    hist = o.new_empty((steps if return_history else 0,))
    return torch.empty_like(o, **like), torch.empty_like(m, **like), torch.empty_like(v, **like), hist


if _extension.compiled():
    _extension.require_ops("cgpm_steps")
    torch.library.register_fake("geokernels::cgpm_steps")(_cgpm_steps_fake)
