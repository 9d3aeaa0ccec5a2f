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
// (evaluated in the scaled form below, which stays finite wherever the reference does)
// with A = max(|a|, eps), F = max(|f|, eps); dl/dc = sign(c) (0 at c = 0, as torch.abs).
#pragma once

#include "geokernels/common.h"

namespace geokernels {

template <class T>
struct CflGrad {
  T a0, a1, f0, f1;
};

// |c| of one pixel, in cosine_similarity's order: each vector is scaled by its clamped norm
// before the product. (a.f) / (A F) would be one division cheaper, but A F underflows in float32
// for small |a|, |f| and eps (|a| ~ 1e-20, f = 0 on a mask border, eps = 1e-30): 0 * inf = NaN.
template <class T, class S>
GK_HD T cfl_value(T a0, T a1, T f0, T f1, S eps) {
  const T iA = T(1) / gk_max(gk_sqrt(a0 * a0 + a1 * a1), T(eps));
  const T iF = T(1) / gk_max(gk_sqrt(f0 * f0 + f1 * f1), T(eps));
  const T c = (a0 * iA) * (f0 * iF) + (a1 * iA) * (f1 * iF);
  return gk_select(gk_gt(c, T(0)), c, T(0) - c);
}

// w * d|c|/d(a0, a1, f0, f1) of one pixel, every term scaled as autograd scales it (unit-ish
// vectors first): dc/da = (f/F)/A - (c/A)(a/|a|), dc/df = (a/A)/F - (c/F)(f/|f|).
template <class T, class S>
GK_HD CflGrad<T> cfl_grad(T a0, T a1, T f0, T f1, S eps, T w) {
  const T na = gk_sqrt(a0 * a0 + a1 * a1);
  const T nf = gk_sqrt(f0 * f0 + f1 * f1);
  const T iA = T(1) / gk_max(na, T(eps));
  const T iF = T(1) / gk_max(nf, T(eps));
  const T ua0 = a0 * iA, ua1 = a1 * iA, uf0 = f0 * iF, uf1 = f1 * iF;
  const T c = ua0 * uf0 + ua1 * uf1;
  const T s = gk_select(gk_gt(c, T(0)), w, gk_select(gk_gt(T(0), c), T(0) - w, T(0)));
  // 1/|a| and 1/|f|, zero where the norm is zero (d|a|/da = 0 at a = 0, as autograd's norm)
  const auto a_pos = gk_gt(na, T(0));
  const auto f_pos = gk_gt(nf, T(0));
  const T ra = gk_select(a_pos, T(1) / gk_select(a_pos, na, T(1)), T(0));
  const T rf = gk_select(f_pos, T(1) / gk_select(f_pos, nf, T(1)), T(0));
  const T sa = s * iA, sf = s * iF;
  const T ka = sa * c, kf = sf * c;
  CflGrad<T> g;
  g.a0 = sa * uf0 - ka * (a0 * ra);
  g.a1 = sa * uf1 - ka * (a1 * ra);
  g.f0 = sf * ua0 - kf * (f0 * rf);
  g.f1 = sf * ua1 - kf * (f1 * rf);
  return g;
}

template <class T>
GK_HD T gk_sigmoid(T x) {
  return T(1) / (T(1) + gk_exp(T(0) - x));
}

}  // namespace geokernels
