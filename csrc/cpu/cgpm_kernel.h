// One fused CGPM step (SPEC.md 1.5) over a row block of one plane, written once and compiled
// twice (cgpm.cpp: baseline ISA, cgpm_avx2.cpp: AVX2+FMA; GK_CPU_ISA names the namespace).
//
// Per block: the closed-form gradient of the shape loss for the block's rows is written by the
// qc2 / qc1 backward block kernels (qc2_kernel.h / qc1_kernel.h, the same code as qc2_loss and
// qc1_loss) into a row buffer that is still in cache when the fused epilogue reads it:
//   dL/du = -2/N relu(u0 - u) + weight * d(qc)/du      (means over the whole batch, as published)
//   g     = dL/du * (1 - u) * u                        (through u = sigmoid(o))
//   Adam:  m, v, o updated in place; u_next = sigmoid(o) written to the other u buffer.
// Neighbours are read from u_cur only (ping-pong), so blocks are independent and the result is
// the same for any thread count. No autograd graph, one pass over the image per step.
#pragma once

#include <algorithm>

#include "qc1_kernel.h"
#include "qc2_kernel.h"

#ifndef GK_CPU_ISA
#error "define GK_CPU_ISA before including cgpm_kernel.h"
#endif

namespace geokernels {
namespace cpu {

template <class S>
struct CgpmStepArgs {
  const S* u_cur;  // sigmoid(o) before the step (neighbours are read here)
  S* u_next;       // sigmoid(o) after the step
  const S* u0;
  S* o;
  S* m;
  S* v;
  S* grad_buf;  // scratch of the shape-loss gradient, shape of o
  int64_t H, W;
  int order;   // 2: qc2_loss, 1: qc1_loss
  Qc2Params<S> qc2;
  int window;
  S qc_weight;    // weight / (number of terms of the shape-loss mean)
  S fid_weight;   // 2 / N
  S beta1, one_minus_beta1, beta2, one_minus_beta2;
  S bias1, bias2;  // 1 - beta^t
  S lr, adam_eps;
  bool with_loss;
  double loss_fid_scale, loss_qc_scale;  // 1 / N and weight / N_qc
};

template <class S>
struct CgpmFns {
  // One step on rows [r0, r1) of plane `plane`; returns the block's share of L (with_loss).
  double (*step_block)(const CgpmStepArgs<S>& a, int64_t plane, int64_t r0, int64_t r1);
};
template <class S>
CgpmFns<S> cgpm_fns_avx2();  // defined in cgpm_avx2.cpp when GK_AVX2_COMPILED

namespace GK_CPU_ISA {

template <class S>
double cgpm_step_block(const CgpmStepArgs<S>& a, int64_t plane, int64_t r0, int64_t r1) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const int64_t H = a.H, W = a.W, off = plane * H * W;
  const S* u = a.u_cur + off;
  S* gq = a.grad_buf + off;
  double loss = 0.0;
  if (a.order == 2) {
    qc2_backward_block<S>(u, nullptr, a.qc_weight, H, W, r0, r1, a.qc2, gq);
    if (a.with_loss) loss += a.loss_qc_scale * qc2_forward_block<S>(u, H, W, r0, r1, a.qc2, nullptr);
  } else {
    // the loss value comes free with the gradient pass
    const double value = qc1_backward_block<S>(u, nullptr, a.qc_weight, H, W, r0, r1, a.window, gq);
    if (a.with_loss) loss += a.loss_qc_scale * value;
  }
  const V zero(S(0)), one(S(1));
  const V fid_w(a.fid_weight), b1(a.beta1), c1(a.one_minus_beta1), b2(a.beta2),
      c2(a.one_minus_beta2), bias1(a.bias1), bias2(a.bias2), lr(a.lr), adam_eps(a.adam_eps);
  V fid_acc(S(0));
  const int64_t begin = off + r0 * W, end = off + r1 * W;
  for (int64_t k = begin; k < end; k += VS) {
    const int n = static_cast<int>(std::min<int64_t>(VS, end - k));
    const V uu = V::loadu(a.u_cur + k, n);
    const V gap = gk_max(V::loadu(a.u0 + k, n) - uu, zero);  // relu(u0 - u)
    if (a.with_loss) {
      const V sq = gap * gap;
      fid_acc = fid_acc + (n == VS ? sq : V::set(zero, sq, n));
    }
    const V grad_u = V::loadu(a.grad_buf + k, n) - fid_w * gap;
    const V g = grad_u * (one - uu) * uu;
    const V m = b1 * V::loadu(a.m + k, n) + c1 * g;
    const V v = b2 * V::loadu(a.v + k, n) + c2 * g * g;
    const V m_hat = m / bias1;
    const V v_hat = v / bias2;
    const V o = V::loadu(a.o + k, n) - lr * m_hat / (v_hat.sqrt() + adam_eps);
    m.store(a.m + k, n);
    v.store(a.v + k, n);
    o.store(a.o + k, n);
    qc1_sigmoid(o).store(a.u_next + k, n);
  }
  if (a.with_loss) {
    S lanes[VS];
    fid_acc.store(lanes);
    double fid = 0.0;
    for (int64_t k = 0; k < VS; ++k) fid += static_cast<double>(lanes[k]);
    loss += a.loss_fid_scale * fid;
  }
  return loss;
}

}  // namespace GK_CPU_ISA
}  // namespace cpu
}  // namespace geokernels
