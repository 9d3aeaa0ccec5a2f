// Pointwise math of the first-order quasi-concavity loss (SPEC.md 1.3), templated on the value
// type so that the scalar C++ path, the SIMD path (at::vec::Vectorized via csrc/cpu/vec_shim.h)
// and the CUDA kernels evaluate literally the same expressions.
//
// For an offset d with unit direction n_d and a pixel p:
//   a_d(p) = uy(p) * n_dy + ux(p) * n_dx            (so h_d(p) = relu(-a_d(p)))
//   w_d(p) = sigmoid(u(p + d) - u(p))               (u outside the image = 0)
// Because n_{-d} = -n_d exactly, a_{-d} = -a_d: of the two offsets d, -d at most one has h > 0.
// The forward therefore walks the half of the offsets with (dy > 0) or (dy == 0, dx > 0) and
// evaluates ONE sigmoid per pair (qc1_pair_value).
//
// Backward (closed form). With the upstream weight W(p) (the scalar grad / (B C K H W) for
// "mean", the loss-map gradient for "none") and s = w (1 - w) = sigmoid'(z):
//   d/du through w:  the pair of pixels {q, q+e} shares z = u(q+e) - u(q) and sigmoid' is even,
//                    so pixel q collects, over all offsets e != 0,
//                    T(q) = sum_e s_e(q) * (W(q+e) relu(a_e(q+e)) - W(q) relu(-a_e(q)))
//                    (the first term is pixel q+e's own term for offset -e; W = 0 outside).
//   d/d(ux, uy):     AX(q) = -W(q) sum_e w_e(q) n_ex [a_e(q) < 0],  AY likewise with n_ey
//                    (relu'(0) = 0, as torch.relu), and grad u = T + Dx^T AX + Dy^T AY.
// The centre offset has n = 0, so h = 0 and it contributes nothing (it only counts in "mean").
#pragma once

#include "geokernels/common.h"

namespace geokernels {

template <class S>
struct Qc1Direction {
  S ny, nx;
};

// n_d = d / (|d| + 1e-8), evaluated in S exactly as the reference does it.
template <class S>
GK_HD Qc1Direction<S> qc1_direction(int dy, int dx) {
  const S fy = static_cast<S>(dy), fx = static_cast<S>(dx);
  const S norm = gk_sqrt(fy * fy + fx * fx) + static_cast<S>(1e-8);
  return {fy / norm, fx / norm};
}

// sigmoid(z) = 1 / (1 + exp(-z))
template <class T>
GK_HD T qc1_sigmoid(T z) {
  return T(1) / (T(1) + gk_exp(T(0) - z));
}

// The product a * b rounded on its own, never fused into an FMA with the add that follows.
// Compilers contract `x * y + z` into an FMA by default (GCC in GNU mode, nvcc, Triton on GPU);
// for a_d below that changes which side of relu's kink a pixel lands on whenever the two
// products cancel exactly, e.g. ux == uy on a diagonal offset next to a flat region, which
// masks have everywhere. The reference rounds both products, so we do too.
GK_HD float gk_mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  volatile float p = a * b;
  return p;
#endif
}
GK_HD double gk_mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  volatile double p = a * b;
  return p;
#endif
}

// a_d = uy n_dy + ux n_dx, both products rounded as in the reference (see gk_mul_rn)
template <class T, class S>
GK_HD T qc1_alignment(T ux, T uy, const Qc1Direction<S>& n) {
  return gk_mul_rn(uy, T(n.ny)) + gk_mul_rn(ux, T(n.nx));
}

// w_d h_d + w_{-d} h_{-d} for one pair: only the offset whose h is positive contributes.
//   u_c = u(p), u_plus = u(p + d), u_minus = u(p - d)
template <class T, class S>
GK_HD T qc1_pair_value(T ux, T uy, T u_c, T u_plus, T u_minus, const Qc1Direction<S>& n) {
  const T a = qc1_alignment(ux, uy, n);
  const auto negative = gk_gt(T(0), a);
  const T neighbour = gk_select(negative, u_plus, u_minus);
  const T magnitude = gk_select(negative, T(0) - a, a);  // relu(-a) or relu(a); 0 at a = 0
  return qc1_sigmoid(neighbour - u_c) * magnitude;
}

// Per-pixel accumulators of the backward pass (see the header comment).
template <class T>
struct Qc1GradAcc {
  T t;        // T(q)
  T sx, sy;   // sum_e w_e n_e [a_e < 0]; AX = -W sx, AY = -W sy
  T value;    // sum_e w_e h_e = the loss map l(q), free in this pass (CGPM loss history)
};

// Adds offset e's share at pixel q. a_c = a_e(q); a_n = a_e(q + e) (any finite value where
// w_n = 0, i.e. outside the image); w_c = W(q); w_n = W(q + e) (0 outside the image).
template <class T, class S>
GK_HD void qc1_grad_accumulate(Qc1GradAcc<T>& acc, T u_c, T u_n, T a_c, T a_n, T w_c, T w_n,
                               const Qc1Direction<S>& n) {
  const T z = u_n - u_c;
  const T w = qc1_sigmoid(z);
  // sigma'(z) is even and serves both pixels' terms: take it from the side where 1 - sigma does
  // not cancel (w * (1 - w) is 0 once w rounds to 1, at z > 17 in float32, 37 in float64)
  const T wl = qc1_sigmoid(gk_min(z, T(0) - z));
  const T s = wl * (T(1) - wl);
  const auto negative = gk_gt(T(0), a_c);
  const T h_c = gk_select(negative, T(0) - a_c, T(0));
  const T h_n = gk_max(a_n, T(0));
  acc.t = acc.t + s * (w_n * h_n - w_c * h_c);
  acc.sx = acc.sx + gk_select(negative, w * T(n.nx), T(0));
  acc.sy = acc.sy + gk_select(negative, w * T(n.ny), T(0));
  acc.value = acc.value + w * h_c;
}

}  // namespace geokernels
