// Shared pieces of the unrolled CFSS iterations (SPEC.md 2.4) used by the CPU and CUDA kernels.
//
// The SPEC's 2-D kernel k[a][b] = exp(-(a^2+b^2)/(2 sigma^2)) / (sum + 1e-15) is separable:
// the sum over the (2h+1)^2 taps is S^2 with S = sum_a exp(-a^2/(2 sigma^2)), so
//   k[a][b] = w[a] * w[b],   w[a] = exp(-a^2/(2 sigma^2)) / sqrt(S^2 + 1e-15)   (exactly).
// Its derivative in sigma is dk = dw (x) w + w (x) dw with
//   dw[a] = w[a] * (a^2 / sigma^3 - S * S' / (S^2 + 1e-15)),   S' = sum_a exp(..) a^2 / sigma^3,
// which is how the kernels get d loss / d sigma from two extra 1-D passes.
#pragma once

#include "geokernels/common.h"

namespace geokernels {

// Largest Gaussian halfsize on every backend (geokernels/ops/cfss.py MAX_HALFSIZE): the taps are
// indexed with int, and a 2049-pixel window already spans any image these kernels are meant for.
constexpr int64_t kCfssMaxHalfsize = 1024;

// w[0..2h] and dw[0..2h] (index a + h) for one sigma > 0.
template <class S>
GK_HD void cfss_gaussian_taps(S sigma, int h, S* w, S* dw) {
  // in r = a / sigma: 1 / (2 sigma^2) and 1 / sigma^3 overflow for a tiny sigma, and the centre
  // tap's exp(-(0 * inf)) was NaN; a tap that underflows to 0 contributes 0 to every sum
  S sum = S(0), dsum = S(0);
  for (int a = -h; a <= h; ++a) {
    const S r = static_cast<S>(a) / sigma;
    const S g = gk_exp(S(-0.5) * r * r);
    w[a + h] = g;
    sum += g;
    if (g > S(0)) dsum += g * r * r / sigma;   // g a^2 / sigma^3
  }
  const S den = sum * sum + S(1e-15);
  const S norm = gk_sqrt(den);
  const S c = sum * dsum / den;
  for (int a = -h; a <= h; ++a) {
    const S wa = w[a + h] / norm;
    const S r = static_cast<S>(a) / sigma;
    w[a + h] = wa;
    dw[a + h] = wa > S(0) ? wa * (r * r / sigma - c) : S(0);   // wa (a^2 / sigma^3 - c)
  }
}

// Number of saved (u, q) states for `iters` iterations with a checkpoint every k iterations:
// the states at t = k, 2k, ... <= iters - 1 (t = 0 is recomputed from o, the last step needs none).
// k = 0 selects the bisection schedule, which saves nothing in the forward.
inline int64_t cfss_num_saved(int64_t iters, int64_t k) {
  return (iters >= 1 && k >= 1) ? (iters - 1) / k : 0;
}

// Slots of the bisection schedule: ceil(log2(iters)) (the recursion depth of reverse_range).
inline int cfss_bisection_slots(int64_t iters) {
  int d = 0;
  while ((int64_t{1} << d) < iters) ++d;
  return d;
}

}  // namespace geokernels
