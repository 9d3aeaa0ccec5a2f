"""Pure-PyTorch oracle for the D-Convexity family (SPEC.md section 1).

Literal transcriptions of the SPEC, written for clarity rather than speed. Every kernel backend
is tested against these functions; do not tune them to match a kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def diff_x(f: torch.Tensor) -> torch.Tensor:
    """SPEC 1.1 ``Dx f[i,j] = f[i,j] - f[i,j-1]`` for j >= 1, 0 at j = 0 (last dim)."""
    return torch.diff(f, dim=-1, prepend=f[..., :1])


def diff_y(f: torch.Tensor) -> torch.Tensor:
    """SPEC 1.1 ``Dy f[i,j] = f[i,j] - f[i-1,j]`` for i >= 1, 0 at i = 0 (second-to-last dim)."""
    return torch.diff(f, dim=-2, prepend=f[..., :1, :])


def _reduce(loss_map: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss_map.mean()
    if reduction == "sum":
        return loss_map.sum()
    if reduction == "none":
        return loss_map
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def qc2_loss_map(
    u: torch.Tensor,
    margin: float = 1e-3,
    beta: float = 1.0,
    eps: float = 1e-8,
    grad_threshold: float = 1e-5,
    activation: str = "softplus",
) -> torch.Tensor:
    """Per-pixel second-order quasi-concavity loss ``l`` (SPEC 1.2), shape of ``u`` (B, C, H, W)."""
    ux = diff_x(u)
    uy = diff_y(u)
    uxx = diff_x(ux)
    uyy = diff_y(uy)
    uxy = diff_y(ux)
    uyx = diff_x(uy)
    m = (uxy + uyx) / 2
    s = ux * ux + uy * uy + eps
    # g = sqrt(s). With eps = 0 a flat pixel has s = 0, where sqrt has no derivative; the mask
    # below removes such pixels (g = 0 <= grad_threshold), so we take the subgradient 0 there
    # instead of letting 0 * inf poison the backward with NaN. Identical values wherever s > 0.
    positive = s > 0
    g = torch.where(positive, torch.sqrt(torch.where(positive, s, torch.ones_like(s))), torch.zeros_like(s))
    mask = g > grad_threshold
    g_safe = torch.where(mask, g, torch.ones_like(g))
    t1 = -uy / g_safe
    t2 = ux / g_safe
    q = t1 * t1 * uxx + 2 * t1 * t2 * m + t2 * t2 * uyy
    x = torch.where(mask, q + margin, torch.zeros_like(q))
    if activation == "softplus":
        phi = F.softplus(x, beta=beta, threshold=20.0)
    elif activation == "relu":
        phi = torch.relu(x)
    else:
        raise ValueError(f"activation must be 'softplus' or 'relu', got {activation!r}")
    return phi * g


def qc2_loss(
    u: torch.Tensor,
    margin: float = 1e-3,
    beta: float = 1.0,
    eps: float = 1e-8,
    grad_threshold: float = 1e-5,
    activation: str = "softplus",
    reduction: str = "mean",
) -> torch.Tensor:
    """Second-order quasi-concavity loss (SPEC 1.2). ``u``: (B, C, H, W) -> scalar or map."""
    return _reduce(qc2_loss_map(u, margin, beta, eps, grad_threshold, activation), reduction)


# ---- SPEC 1.3: first-order quasi-concavity loss ---------------------------------------------

def qc1_offsets(window: int, dtype: torch.dtype = torch.float64, device=None):
    """The K = window**2 offsets d = (dy, dx) in row-major order and their unit directions
    ``n_d = d / (|d| + 1e-8)`` (SPEC 1.3), as (K, 2) tensors (integer offsets, dtype directions)."""
    r = window // 2
    offsets = torch.tensor([(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)],
                           dtype=torch.int64, device=device)
    d = offsets.to(dtype)
    norm = torch.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
    return offsets, d / (norm + 1e-8).unsqueeze(1)


def qc1_loss_terms(u: torch.Tensor, window: int = 7) -> torch.Tensor:
    """All K per-offset terms ``l_d = w_d * h_d`` of SPEC 1.3 as a (B, C, K, H, W) tensor.

    This materialises the window**2 maps (as the published implementation does); the fused
    kernels never do.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window!r}")
    B, C, H, W = u.shape
    r = window // 2
    ux = diff_x(u)
    uy = diff_y(u)
    offsets, n = qc1_offsets(window, u.dtype, u.device)
    K = offsets.shape[0]
    padded = F.pad(u, (r, r, r, r))  # u outside the image = 0
    neighbours = torch.stack(
        [padded[..., r + dy:r + dy + H, r + dx:r + dx + W] for dy, dx in offsets.tolist()], dim=2)
    w = torch.sigmoid(neighbours - u.unsqueeze(2))
    n_dy = n[:, 0].view(1, 1, K, 1, 1)
    n_dx = n[:, 1].view(1, 1, K, 1, 1)
    h = torch.relu(-(uy.unsqueeze(2) * n_dy + ux.unsqueeze(2) * n_dx))
    return w * h


def qc1_loss(u: torch.Tensor, window: int = 7, reduction: str = "mean") -> torch.Tensor:
    """First-order quasi-concavity loss (SPEC 1.3). ``u``: (B, C, H, W) -> scalar, or for
    reduction="none" the per-pixel sum over the K offsets, shape of ``u``. "mean" divides by
    B*C*K*H*W (the centre offset counts)."""
    terms = qc1_loss_terms(u, window)
    if reduction == "none":
        return terms.sum(dim=2)
    return _reduce(terms, reduction)


# ---- SPEC 1.4: fidelity ------------------------------------------------------------------------

def fidelity_loss(u: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
    """One-sided fidelity ``mean(relu(u0 - u)**2)`` (SPEC 1.4): convexification only raises u."""
    return torch.relu(u0 - u).pow(2).mean()


# ---- SPEC 1.5: CGPM, the unrolled Adam projection --------------------------------------------

def _sqrt_zero_safe(x: torch.Tensor) -> torch.Tensor:
    # sqrt with subgradient 0 at x = 0. Adam's v is exactly 0 where every gradient so far was 0
    # (flat regions); there m = 0 too, so the exact derivative of the update through v is 0,
    # while plain sqrt would give 0 * inf = NaN when differentiating through the loop.
    # Values are identical to torch.sqrt everywhere.
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))),
                       torch.zeros_like(x))


def cgpm_normalise(logits: torch.Tensor) -> torch.Tensor:
    """SPEC 1.5 ``o = logits / (max_{H,W} |logits| + 1e-8)`` per (b, c)."""
    return logits / (logits.abs().amax(dim=(-2, -1), keepdim=True) + 1e-8)


def cgpm_loss(u: torch.Tensor, u0: torch.Tensor, method: str = "c2", weight: float = 1.0,
              **loss_kwargs) -> torch.Tensor:
    """The CGPM objective ``fidelity_loss(u, u0) + weight * qc{2|1}_loss(u)`` (SPEC 1.5)."""
    if method == "c2":
        shape = qc2_loss(u, reduction="mean", **loss_kwargs)
    elif method == "c1":
        shape = qc1_loss(u, reduction="mean", **loss_kwargs)
    else:
        raise ValueError(f"method must be 'c2' or 'c1', got {method!r}")
    return fidelity_loss(u, u0) + weight * shape


def cgpm_adam_step(o, m, v, g, t: int, lr: float, betas=(0.9, 0.999), adam_eps: float = 1e-8):
    """One Adam update of SPEC 1.5 at step ``t`` (1-based): returns (o, m, v)."""
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    o = o - lr * m_hat / (_sqrt_zero_safe(v_hat) + adam_eps)
    return o, m, v


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
    **loss_kwargs,
):
    """Convex gradient projection module, the reference autograd loop (SPEC 1.5).

    ``logits``: (B, C, H, W). Returns the refined probabilities ``sigmoid(o)`` (B, C, H, W) and,
    with ``return_history``, the (steps,) losses L evaluated at the start of each step.
    With ``backprop_to_backbone`` the whole loop is differentiated (create_graph=True), so the
    result carries gradients to ``logits`` (u0 = sigmoid(o) is a function of the logits too);
    otherwise the result is detached from ``logits``.
    """
    o = cgpm_normalise(logits)
    u0 = torch.sigmoid(o)
    if not backprop_to_backbone:
        o = o.detach()
        u0 = u0.detach()
    m = torch.zeros_like(o)
    v = torch.zeros_like(o)
    history = []
    with torch.enable_grad():
        if not backprop_to_backbone:
            o = o.requires_grad_()
        elif not o.requires_grad:
            o = o.detach().requires_grad_()
        for t in range(1, steps + 1):
            loss = cgpm_loss(torch.sigmoid(o), u0, method, weight, **loss_kwargs)
            history.append(loss.detach())
            (g,) = torch.autograd.grad(loss, o, create_graph=backprop_to_backbone)
            o, m, v = cgpm_adam_step(o, m, v, g, t, lr, betas, adam_eps)
            if not backprop_to_backbone:
                o = o.detach().requires_grad_()
    out = torch.sigmoid(o)
    if not backprop_to_backbone:
        out = out.detach()
    if return_history:
        hist = torch.stack(history) if history else logits.new_zeros((0,))
        return out, hist
    return out
