// Pointwise math of the second-order quasi-concavity loss (SPEC.md 1.2), templated on the value
// type so that the scalar C++ path, the SIMD path (at::vec::Vectorized, see csrc/cpu/vec_shim.h)
// and the CUDA kernels evaluate literally the same expressions, in the reference's order.
#pragma once

#include "geokernels/common.h"

namespace geokernels {

template <class S>
struct Qc2Params {
  S margin, beta, eps, grad_threshold;
  bool relu;
};

template <class T>
struct Qc2Stencil {
  T ux, uy, uxx, uyy, m;
};

// Inputs are u at (i,j), (i,j-1), (i,j-2), (i-1,j), (i-2,j), (i-1,j-1) with row/column indices
// clamped at 0. Clamping (replicate padding) reproduces the "prepend" backward differences of
// SPEC 1.1 exactly: every first or second difference that the SPEC sets to 0 on the first row or
// column becomes x - x = 0, and the others see the same operands as the reference.
template <class T>
GK_HD Qc2Stencil<T> qc2_stencil(T c, T l, T ll, T t, T tt, T tl) {
  Qc2Stencil<T> s;
  s.ux = c - l;
  s.uy = c - t;
  const T ux_left = l - ll;  // ux at (i, j-1)
  const T ux_top = t - tl;   // ux at (i-1, j)
  const T uy_top = t - tt;   // uy at (i-1, j)
  const T uy_left = l - tl;  // uy at (i, j-1)
  s.uxx = s.ux - ux_left;
  s.uyy = s.uy - uy_top;
  const T uxy = s.ux - ux_top;
  const T uyx = s.uy - uy_left;
  s.m = (uxy + uyx) * T(0.5);
  return s;
}

// Shared front half of value and gradient: g, the mask, the unit tangent and x = Q + margin.
template <class T>
struct Qc2Core {
  T g, g_safe, t1, t2, x;
  decltype(gk_gt(T(0), T(0))) positive, mask;
};

template <class T, class S>
GK_HD Qc2Core<T> qc2_core(const Qc2Stencil<T>& st, const Qc2Params<S>& p) {
  Qc2Core<T> c;
  const T s = st.ux * st.ux + st.uy * st.uy + T(p.eps);
  c.positive = gk_gt(s, T(0));
  // sqrt with subgradient 0 at s = 0 (only reachable with eps = 0; such pixels are masked).
  c.g = gk_select(c.positive, gk_sqrt(gk_select(c.positive, s, T(1))), T(0));
  c.mask = gk_gt(c.g, T(p.grad_threshold));
  c.g_safe = gk_select(c.mask, c.g, T(1));
  c.t1 = (T(0) - st.uy) / c.g_safe;
  c.t2 = st.ux / c.g_safe;
  const T q = c.t1 * c.t1 * st.uxx + T(2) * c.t1 * c.t2 * st.m + c.t2 * c.t2 * st.uyy;
  c.x = gk_select(c.mask, q + T(p.margin), T(0));
  return c;
}

// phi(x) and, if wanted, phi'(x) with PyTorch's softplus semantics (threshold 20) or relu.
template <class T, class S>
GK_HD T qc2_activation(T x, const Qc2Params<S>& p, T* dphi) {
  if (p.relu) {
    const auto pos = gk_gt(x, T(0));
    if (dphi) *dphi = gk_select(pos, T(1), T(0));
    return gk_select(pos, x, T(0));
  }
  const T bx = x * T(p.beta);
  const T z = gk_exp(bx);
  const auto linear = gk_gt(bx, T(20));
  if (dphi) *dphi = gk_select(linear, T(1), z / (z + T(1)));
  return gk_select(linear, x, gk_log1p(z) / T(p.beta));
}

// l = phi(x) * g  (SPEC 1.2)
template <class T, class S>
GK_HD T qc2_value(const Qc2Stencil<T>& st, const Qc2Params<S>& p) {
  const Qc2Core<T> c = qc2_core(st, p);
  return qc2_activation(c.x, p, static_cast<T*>(nullptr)) * c.g;
}

// Partial derivatives of w * l with respect to the stencil quantities ux, uy, uxx, uyy, m.
template <class T>
struct Qc2Partials {
  T ax, ay, axx, ayy, am;
};

template <class T, class S>
GK_HD Qc2Partials<T> qc2_partials(const Qc2Stencil<T>& st, const Qc2Params<S>& p, T w) {
  const Qc2Core<T> c = qc2_core(st, p);
  T dphi;
  const T phi = qc2_activation(c.x, p, &dphi);
  const T a = gk_select(c.mask, w * c.g * dphi, T(0));  // d(w l)/dQ
  T grad_g = w * phi;                                    // direct d(w l)/dg
  Qc2Partials<T> r;
  r.axx = a * c.t1 * c.t1;
  r.ayy = a * c.t2 * c.t2;
  r.am = a * T(2) * c.t1 * c.t2;
  const T grad_t1 = a * (T(2) * c.t1 * st.uxx + T(2) * c.t2 * st.m);
  const T grad_t2 = a * (T(2) * c.t2 * st.uyy + T(2) * c.t1 * st.m);
  const T inv_g = T(1) / c.g_safe;
  // t1 = -uy/g_safe, t2 = ux/g_safe; g_safe = g where masked in, else the constant 1. So
  // (grad_t1 uy - grad_t2 ux) / g^2 = -(grad_t1 t1 + grad_t2 t2) / g: the unit-vector form, as
  // autograd evaluates it (the product with uy, ux grows like |u|^3 and overflowed past 1e12).
  grad_g = grad_g + gk_select(c.mask, (T(0) - (grad_t1 * c.t1 + grad_t2 * c.t2)) * inv_g, T(0));
  const T dg = gk_select(c.positive, grad_g / gk_select(c.positive, c.g, T(1)), T(0));
  r.ax = grad_t2 * inv_g + dg * st.ux;
  r.ay = (T(0) - grad_t1) * inv_g + dg * st.uy;
  return r;
}

}  // namespace geokernels
