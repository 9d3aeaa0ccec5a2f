// Shared math of the exact distance transform and the contour-flow field (SPEC.md 2.1-2.2),
// included by csrc/cpu/distance.cpp and csrc/cuda/distance.cu: one source of truth for the
// integer distance algebra, the "no background" convention and the field's pointwise formula.
//
// Exactness: squared distances are integers (i - k)^2 + (j - l)^2 computed in int64, so the
// separable minimisation is exact; a distance is sqrt(double(n)) rounded once to the output dtype
// (for float32 this equals the correctly rounded sqrt, so it matches scipy's float64 result cast
// to float32 bit for bit).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "geokernels/common.h"

namespace geokernels {

// What a plane without a single background pixel gets (no distance is defined there).
enum class NoBackground : int {
  Inf = 0,    // +inf everywhere (the distance to an empty set)
  Scipy = 1,  // scipy.ndimage.distance_transform_edt's value: the distance to the virtual
              // pixel (-1, 0) just above the top-left corner, sqrt((i + 1)^2 + j^2)
};

// Column distances g are int32 with a "no background in this column" sentinel of H + W (as in
// Meijster et al.): any true squared distance is < (H + W)^2, so a parabola rooted at a sentinel
// column can never win the row minimisation, while sweeps may add up to H - 1 to it without
// overflow. Values >= edt_infinity mean "infinite".
GK_HD int32_t edt_infinity(int64_t H, int64_t W) { return static_cast<int32_t>(H + W); }

// True for pixels the distance is measured TO: zero pixels, or nonzero pixels when inverted
// (the inverted transform is EDT(1 - m) of a binary mask without materialising 1 - m).
template <class T>
GK_HD bool edt_is_target(T v, bool invert) {
  const bool nonzero = static_cast<bool>(v != static_cast<T>(0));
  return invert ? nonzero : !nonzero;
}

// One parabola of the row pass: (x - k)^2 + g[k]^2.
GK_HD int64_t edt_parabola(const int32_t* g, int64_t x, int64_t k) {
  const int64_t gk = g[k];
  return (x - k) * (x - k) + gk * gk;
}

// min_k (j - k)^2 + g[k]^2 by scanning k outward from j until (k - j)^2 alone reaches the best
// value found: exact (no farther k can win), O(min(g[j], W)) steps since the k = j term bounds
// the answer by g[j]^2.
GK_HD int64_t edt_row_min_scan(const int32_t* g, int64_t W, int64_t j) {
  const int64_t gj = g[j];
  int64_t best = gj * gj;
  for (int64_t r = 1; r * r < best && (j - r >= 0 || j + r < W); ++r) {
    if (j - r >= 0) {
      const int64_t c = edt_parabola(g, j, j - r);
      best = c < best ? c : best;
    }
    if (j + r < W) {
      const int64_t c = edt_parabola(g, j, j + r);
      best = c < best ? c : best;
    }
  }
  return best;
}

// A row is minimised by the scan when sum_j min(g[j], W) (a bound on its steps) is at most this
// many steps per pixel, else by the envelope (about this costly per pixel, but never more).
constexpr int64_t kEdtScanStepsPerPixel = 4;

// Lower envelope of the parabolas x -> (x - k)^2 + g[k]^2, k = 0..W-1 (Meijster, Roerdink &
// Hesselink 2000, the integer form of Felzenszwalb-Huttenlocher): on return s[0..n) are the
// parabolas of the envelope from left to right and t[q] is the first x where s[q] is minimal
// (t[0] = 0, increasing). O(W), all integer. Returns n.
GK_HD int64_t edt_envelope(const int32_t* g, int64_t W, int32_t* s, int32_t* t) {
  int64_t q = 0;
  s[0] = 0;
  t[0] = 0;
  for (int64_t u = 1; u < W; ++u) {
    while (q >= 0 && edt_parabola(g, t[q], s[q]) > edt_parabola(g, t[q], u)) --q;
    if (q < 0) {
      q = 0;
      s[0] = static_cast<int32_t>(u);
    } else {
      // Sep(i, u): the last x where parabola i is not worse than u (floor division; the
      // numerator is >= 0 here because i was not worse at t[q] >= 0)
      const int64_t i = s[q], gi = g[i], gu = g[u];
      const int64_t w = 1 + (u * u - i * i + gu * gu - gi * gi) / (2 * (u - i));
      if (w < W) {
        ++q;
        s[q] = static_cast<int32_t>(u);
        t[q] = static_cast<int32_t>(w);
      }
    }
  }
  return q + 1;
}

template <class S>
GK_HD S edt_from_squared(int64_t n) {
  return static_cast<S>(::sqrt(static_cast<double>(n)));
}

template <class S>
GK_HD S edt_no_background_value(NoBackground mode, int64_t i, int64_t j) {
  if (mode == NoBackground::Scipy) return edt_from_squared<S>((i + 1) * (i + 1) + j * j);
  return static_cast<S>(INFINITY);
}

// Products that nvcc must not contract into FMAs (the reference rounds each product).
GK_HD float gk_mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GK_HD double gk_mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// SPEC 2.2 after the stencil: N = G / max(|G|, 1e-20), F = (-N1, N0) (unit tangent).
template <class S>
struct FlowPair {
  S f0, f1;
};

template <class S>
GK_HD FlowPair<S> contour_flow_from_gradient(S g0, S g1) {
  const S norm = gk_sqrt(gk_mul_rn(g0, g0) + gk_mul_rn(g1, g1));
  const S floor_ = static_cast<S>(1e-20);
  const S den = norm < floor_ ? floor_ : norm;
  return {-(g1 / den), g0 / den};
}

// The (row, column) gradient G of SPEC 2.2 at an interior pixel, from d_in = EDT(m) and
// d_out = EDT(1 - m): forward stencil d[.+1] - d[.], central (d[.+1] - d[.-1]) / 2; inside the
// mask the stencil runs on d_in, outside on -d_out. (m is 0/1, so G = grad(d_in) m +
// grad(-d_out) (1 - m) picks one term exactly.)
template <class S>
GK_HD S contour_flow_stencil(S next, S here, S prev, bool central) {
  return central ? (next - prev) / static_cast<S>(2) : next - here;
}

}  // namespace geokernels
