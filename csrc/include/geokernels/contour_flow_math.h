// Pointwise math of the contour-flow shape loss (SPEC.md 2.3), templated on the value type so the
// scalar C++ path, the SIMD path (at::vec::Vectorized via csrc/cpu/vec_shim.h) and the CUDA
// kernels evaluate the same expressions.
//
// Per pixel: a = grad+ u (2 components, zero padding), f = the class's 2 flow channels,
//   c = sum_k (a_k / max(|a|, eps)) * (f_k / max(|f|, eps))      (cosine_similarity's order)
//   l = |c|.
// Gradient: torch.nn.functional.cosine_similarity clamps the norms in place under no_grad, so
// autograd differentiates the clamped norm as if it were |a| (d|a|/da = a/|a|, 0 at a = 0) even
// where |a| < eps. We reproduce that exactly:
//   dc/da = f / (A F) - (a.f) / (A^2 F) * a/|a|,   dc/df = a / (A F) - (a.f) / (A F^2) * f/|f|
// with A = max(|a|, eps), F = max(|f|, eps); dl/dc = sign(c) (0 at c = 0, as torch.abs).
#pragma once

#include "geokernels/common.h"

namespace geokernels {

template <class T>
struct CflGrad {
  T a0, a1, f0, f1;
};

// |c| of one pixel. c = (a.f) / (A F): the same value as cosine_similarity's
// sum_k (a_k / A)(f_k / F) up to rounding, with one division instead of four.
template <class T, class S>
GK_HD T cfl_value(T a0, T a1, T f0, T f1, S eps) {
  const T A = gk_max(gk_sqrt(a0 * a0 + a1 * a1), T(eps));
  const T Fn = gk_max(gk_sqrt(f0 * f0 + f1 * f1), T(eps));
  const T c = (a0 * f0 + a1 * f1) / (A * Fn);
  return gk_select(gk_gt(c, T(0)), c, T(0) - c);
}

// w * d|c|/d(a0, a1, f0, f1) of one pixel.
template <class T, class S>
GK_HD CflGrad<T> cfl_grad(T a0, T a1, T f0, T f1, S eps, T w) {
  const T na = gk_sqrt(a0 * a0 + a1 * a1);
  const T nf = gk_sqrt(f0 * f0 + f1 * f1);
  const T A = gk_max(na, T(eps));
  const T Fn = gk_max(nf, T(eps));
  const T inv = T(1) / (A * Fn);
  const T c = (a0 * f0 + a1 * f1) * inv;
  const T s = gk_select(gk_gt(c, T(0)), w, gk_select(gk_gt(T(0), c), T(0) - w, T(0)));
  const T si = s * inv;
  // (s c / A) (a / |a|) and (s c / F) (f / |f|), zero where the norm is zero. Scaled as
  // autograd scales it (the unit vector first): s c / (A |a|) * a overflows in float32 once
  // A |a| is subnormal (|a| ~ 1e-20 with a small eps): inf * 0 = NaN where the reference is finite.
  const auto a_pos = gk_gt(na, T(0));
  const auto f_pos = gk_gt(nf, T(0));
  const T sc = s * c;
  const T ra = gk_select(a_pos, T(1) / gk_select(a_pos, na, T(1)), T(0));   // 1/|a|, 0 at a = 0
  const T rf = gk_select(f_pos, T(1) / gk_select(f_pos, nf, T(1)), T(0));
  const T ka = sc / A;
  const T kf = sc / Fn;
  CflGrad<T> g;
  g.a0 = f0 * si - ka * (a0 * ra);
  g.a1 = f1 * si - ka * (a1 * ra);
  g.f0 = a0 * si - kf * (f0 * rf);
  g.f1 = a1 * si - kf * (f1 * rf);
  return g;
}

template <class T>
GK_HD T gk_sigmoid(T x) {
  return T(1) / (T(1) + gk_exp(T(0) - x));
}

}  // namespace geokernels
