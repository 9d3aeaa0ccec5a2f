"""Triton kernels of the fused CGPM loop (SPEC.md 1.5), wrapped as a torch.library custom op.

Same contract as ``torch.ops.geokernels.cgpm_steps``. Per step, with u = sigmoid(o) kept in a
ping-pong pair of buffers (neighbours are read from the current one only):
  * method "c2": ONE kernel: the qc2 gradient of the tile (the same jit helper as qc2_loss's
    backward, geokernels/triton/qc_loss.py) + fidelity gradient + sigmoid chain + Adam, writing
    o, m, v and the next u.
  * method "c1": the qc1 gather kernel of qc1_loss's backward (T, AX, AY), then one kernel for the
    adjoint stencil + fidelity + sigmoid chain + Adam.
Per-step scalars (Adam bias corrections, loss weights) sit in a small device table in the compute
dtype, so float64 runs keep float64 constants (Triton passes Python floats as float32).
Runs on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from geokernels.triton import qc_loss as _qc
from geokernels.triton._tiles import (compute_dtype, compute_torch_dtype, device_guard, sqrt_ieee,
                                      tile_coords, tile_grid)

BLOCK_H = 16
BLOCK_W = 32
# column layout of the per-step parameter table
(P_LR, P_B1, P_C1, P_B2, P_C2, P_BIAS1, P_BIAS2, P_AEPS, P_QCW, P_FIDW, P_MARGIN, P_BETA, P_EPS,
 P_THR) = range(14)
N_PARAMS = 14


@triton.jit
def _adam_epilogue(u_ptr, un_ptr, u0_ptr, o_ptr, m_ptr, v_ptr, prm, idx, valid, grad_shape,
                   CDT: tl.constexpr):
    """dL/du = grad_shape - 2/N relu(u0 - u); g = dL/du (1 - u) u; Adam; u_next = sigmoid(o)."""
    uu = tl.load(u_ptr + idx, mask=valid, other=0.0).to(CDT)
    u0 = tl.load(u0_ptr + idx, mask=valid, other=0.0).to(CDT)
    gap = tl.maximum(u0 - uu, 0.0)
    grad_u = grad_shape - tl.load(prm + 9) * gap  # P_FIDW
    g = grad_u * (1.0 - uu) * uu
    m = tl.load(prm + 1) * tl.load(m_ptr + idx, mask=valid, other=0.0).to(CDT) + tl.load(prm + 2) * g
    v = tl.load(prm + 3) * tl.load(v_ptr + idx, mask=valid, other=0.0).to(CDT) + tl.load(prm + 4) * g * g
    m_hat = m / tl.load(prm + 5)
    v_hat = v / tl.load(prm + 6)
    o = tl.load(o_ptr + idx, mask=valid, other=0.0).to(CDT) - tl.load(prm + 0) * m_hat / (sqrt_ieee(v_hat) + tl.load(prm + 7))
    tl.store(m_ptr + idx, m.to(m_ptr.dtype.element_ty), mask=valid)
    tl.store(v_ptr + idx, v.to(v_ptr.dtype.element_ty), mask=valid)
    tl.store(o_ptr + idx, o.to(o_ptr.dtype.element_ty), mask=valid)
    tl.store(un_ptr + idx, _sigmoid(o).to(un_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _sigmoid(o):
    # the one sigmoid of the Triton CGPM: the steps' u_next, the first u and u0 (sigmoid_kernel)
    # must agree bit for bit, or relu(u0 - u) is an ulp off 0 at a fixed point and Adam blows
    # that spurious gradient up to lr-sized steps (torch.sigmoid rounds differently)
    return 1.0 / (1.0 + tl.exp(0.0 - o))


@triton.jit
def _sigmoid_kernel(o_ptr, out_ptr, n, CDT: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < n
    o = tl.load(o_ptr + idx, mask=valid, other=0.0).to(CDT)
    tl.store(out_ptr + idx, _sigmoid(o).to(out_ptr.dtype.element_ty), mask=valid)


def _launch_sigmoid(o: torch.Tensor) -> torch.Tensor:
    o = o.contiguous()
    out = torch.empty_like(o)
    if o.numel():
        with device_guard(o):
            _sigmoid_kernel[(triton.cdiv(o.numel(), 1024),)](o, out, o.numel(),
                                                              CDT=compute_dtype(o.dtype), BLOCK=1024)
    return out


@torch.library.custom_op("geokernels_triton::cgpm_sigmoid", mutates_args=())
def sigmoid(o: torch.Tensor) -> torch.Tensor:
    """sigmoid(o) exactly as the Triton CGPM steps compute it (for u0; not differentiable)."""
    return _launch_sigmoid(o)


@sigmoid.register_fake
def _(o):
    return torch.empty_like(o, memory_format=torch.contiguous_format)


@triton.jit
def _cgpm_c2_step_kernel(u_ptr, un_ptr, u0_ptr, o_ptr, m_ptr, v_ptr, prm_ptr, H, W,
                         RELU: tl.constexpr, CDT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    off = plane * H * W
    valid = (i < H) & (j < W)
    prm = prm_ptr
    qc_weight = tl.load(prm + 8)
    margin = tl.load(prm + 10)
    beta = tl.load(prm + 11)
    eps = tl.load(prm + 12)
    thr = tl.load(prm + 13)
    ub = u_ptr + off
    grad_shape = _qc._qc2_grad_tile(ub, ub, i, j, H, W, qc_weight, margin, beta, eps, thr,
                                    RELU, False, CDT)
    _adam_epilogue(u_ptr, un_ptr, u0_ptr, o_ptr, m_ptr, v_ptr, prm, off + i * W + j, valid,
                   grad_shape, CDT)


@triton.jit
def _cgpm_c1_finish_kernel(t_ptr, ax_ptr, ay_ptr, u_ptr, un_ptr, u0_ptr, o_ptr, m_ptr, v_ptr,
                           prm_ptr, H, W, CDT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    plane, i, j = tile_coords(pid, H, W, BH, BW)
    off = plane * H * W
    valid = (i < H) & (j < W)
    grad_shape = _qc._qc1_adjoint(t_ptr, ax_ptr, ay_ptr, off, i, j, H, W, valid).to(CDT)
    _adam_epilogue(u_ptr, un_ptr, u0_ptr, o_ptr, m_ptr, v_ptr, prm_ptr, off + i * W + j, valid,
                   grad_shape, CDT)


def _param_table(first_step, steps, lr, beta1, beta2, adam_eps, weight, order, margin, beta, eps,
                 grad_threshold, window, numel, dtype, device):
    n_qc = numel * window * window if order == 1 else numel
    rows = []
    for s in range(steps):
        t = first_step + s + 1
        rows.append([lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - beta1 ** t,
                     1.0 - beta2 ** t, adam_eps, weight / n_qc, 2.0 / numel, margin, beta, eps,
                     grad_threshold])
    return torch.tensor(rows, dtype=torch.float64).reshape(steps, N_PARAMS).to(dtype).to(device)


@torch.library.custom_op("geokernels_triton::cgpm_steps", mutates_args=())
def cgpm_steps(o: torch.Tensor, m: torch.Tensor, v: torch.Tensor, u0: torch.Tensor,
               first_step: int, steps: int, lr: float, beta1: float, beta2: float,
               adam_eps: float, weight: float, order: int, margin: float, beta: float, eps: float,
               grad_threshold: float, activation: str, window: int,
               return_history: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(o):
        o = o.contiguous().clone()
        m = m.contiguous().clone()
        v = v.contiguous().clone()
        u0 = u0.contiguous()
        cdt_torch = compute_torch_dtype(o.dtype)
        cdt = compute_dtype(o.dtype)
        history = torch.zeros((steps if return_history else 0,), dtype=torch.float64, device=o.device)
        if steps == 0:
            return o, m, v, history.to(o.dtype)
        H, W = o.shape[-2:]
        grid = tile_grid(o, BLOCK_H, BLOCK_W)
        table = _param_table(first_step, steps, lr, beta1, beta2, adam_eps, weight, order, margin,
                             beta, eps, grad_threshold, window, o.numel(), cdt_torch, o.device)
        u_cur = _launch_sigmoid(o)
        u_next = torch.empty_like(o)
        qc_weight = table[:, P_QCW].contiguous()
        for s in range(steps):
            if return_history:
                fid = torch.relu(u0 - u_cur).double().pow(2).mean()
                if order == 2:
                    shape = _qc.qc2_loss_forward(u_cur, margin, beta, eps, grad_threshold, activation, "mean")
                else:
                    shape = _qc.qc1_loss_forward(u_cur, window, "mean")
                history[s] = fid + weight * shape.double()
            prm = table[s]
            if order == 2:
                _cgpm_c2_step_kernel[grid](u_cur, u_next, u0, o, m, v, prm, H, W,
                                           RELU=activation == "relu", CDT=cdt, BH=BLOCK_H, BW=BLOCK_W,
                                           num_warps=8)   # 4 warps: fp64 spilled 1.7 KB (sm_90)
            else:
                t, ax, ay = _qc.qc1_grad(u_cur, qc_weight[s:s + 1], False, window, finish=False)
                _cgpm_c1_finish_kernel[grid](t, ax, ay, u_cur, u_next, u0, o, m, v, prm, H, W,
                                             CDT=cdt, BH=BLOCK_H, BW=BLOCK_W)
            u_cur, u_next = u_next, u_cur
        return o, m, v, history.to(o.dtype)


@cgpm_steps.register_fake
def _(o, m, v, u0, first_step, steps, lr, beta1, beta2, adam_eps, weight, order, margin, beta,
      eps, grad_threshold, activation, window, return_history):
    like = dict(memory_format=torch.contiguous_format)
    hist = o.new_empty((steps if return_history else 0,))
    return torch.empty_like(o, **like), torch.empty_like(m, **like), torch.empty_like(v, **like), hist
