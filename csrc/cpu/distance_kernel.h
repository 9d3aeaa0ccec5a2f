// CPU kernels of the exact Euclidean distance transform (SPEC.md 2.1-2.2): two separable passes.
//
// Column pass: g[i,j] = |i - k| for the nearest target pixel k in column j (a down sweep and an
// up sweep, run row by row over a block of columns so the inner loop is contiguous and
// vectorises). Row pass: d^2[i,j] = min_k (j - k)^2 + g[i,k]^2, the lower envelope of parabolas
// of Meijster, Roerdink & Hesselink (2000) (the integer form of Felzenszwalb-Huttenlocher): O(W)
// per row, all in int64, so the result is exact.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "distance_math.h"

namespace geokernels {
namespace cpu {

// Column pass over columns [c0, c1) of one H x W plane.
template <class T>
void edt_column_block(const T* mask, int64_t H, int64_t W, int64_t c0, int64_t c1, bool invert,
                      int32_t* g) {
  const int32_t inf = edt_infinity(H, W);
  const int32_t flip = invert ? 1 : 0;
  // branch-free so the loops vectorise: keep = 1 for non-target pixels (edt_is_target negated)
  for (int64_t j = c0; j < c1; ++j) {
    const int32_t keep = static_cast<int32_t>(mask[j] != static_cast<T>(0)) ^ flip;
    g[j] = inf & -keep;
  }
  for (int64_t i = 1; i < H; ++i) {
    const T* m = mask + i * W;
    const int32_t* up = g + (i - 1) * W;
    int32_t* row = g + i * W;
    for (int64_t j = c0; j < c1; ++j) {
      const int32_t keep = static_cast<int32_t>(m[j] != static_cast<T>(0)) ^ flip;
      row[j] = (up[j] + 1) & -keep;
    }
  }
  for (int64_t i = H - 2; i >= 0; --i) {
    const int32_t* down = g + (i + 1) * W;
    int32_t* row = g + i * W;
    for (int64_t j = c0; j < c1; ++j) row[j] = std::min(row[j], down[j] + 1);
  }
}

// True if the plane holds at least one target pixel (then every column distance chain is
// anchored and every row has a finite minimum). Reads row 0 of the column pass only.
inline bool edt_plane_has_target(const int32_t* g, int64_t H, int64_t W) {
  const int32_t inf = edt_infinity(H, W);
  for (int64_t j = 0; j < W; ++j)
    if (g[j] < inf) return true;
  return false;
}

// Scratch of one row minimisation (Meijster's s and t arrays).
struct EdtRowScratch {
  std::vector<int32_t> s, t;
  explicit EdtRowScratch(int64_t W) : s(static_cast<size_t>(W)), t(static_cast<size_t>(W)) {}
};

// Row pass for one row by scanning k outward from every pixel j until (k - j)^2 alone reaches
// the best value found: exact, and O(min(g[j], W)) per pixel since the k = j term already
// bounds the answer by g[j]^2. Much cheaper than the envelope where most column distances are
// small (background-dominated rows: a zero pixel costs one read).
template <class S>
void edt_row_scan(const int32_t* g, int64_t W, S* out) {
  for (int64_t j = 0; j < W; ++j) {
    const int64_t gj = g[j];
    if (gj == 0) {
      out[j] = S(0);
      continue;
    }
    int64_t best = gj * gj;
    for (int64_t r = 1; r * r < best; ++r) {
      if (j - r >= 0) {
        const int64_t v = g[j - r];
        best = std::min(best, r * r + v * v);
      }
      if (j + r < W) {
        const int64_t v = g[j + r];
        best = std::min(best, r * r + v * v);
      }
      if (j - r < 0 && j + r >= W) break;
    }
    out[j] = edt_from_squared<S>(best);
  }
}

// Row pass for one row by the lower envelope of parabolas, O(W).
template <class S>
void edt_row_envelope(const int32_t* g, int64_t W, EdtRowScratch& scratch, S* out) {
  int32_t* s = scratch.s.data();
  int32_t* t = scratch.t.data();
  auto f = [g](int64_t x, int64_t i) {
    const int64_t gi = g[i];
    return (x - i) * (x - i) + gi * gi;
  };
  // Sep(i, u): the last x at which parabola i is not worse than parabola u (floor division; the
  // numerator is >= 0 whenever it is evaluated, see the loop condition).
  auto sep = [g](int64_t i, int64_t u) {
    const int64_t gi = g[i], gu = g[u];
    return (u * u - i * i + gu * gu - gi * gi) / (2 * (u - i));
  };
  int64_t q = 0;
  s[0] = 0;
  t[0] = 0;
  for (int64_t u = 1; u < W; ++u) {
    while (q >= 0 && f(t[q], s[q]) > f(t[q], u)) --q;
    if (q < 0) {
      q = 0;
      s[0] = static_cast<int32_t>(u);
    } else {
      const int64_t w = 1 + sep(s[q], u);
      if (w < W) {
        ++q;
        s[q] = static_cast<int32_t>(u);
        t[q] = static_cast<int32_t>(w);
      }
    }
  }
  for (int64_t u = W - 1; u >= 0; --u) {
    out[u] = edt_from_squared<S>(f(u, s[q]));
    if (u == t[q]) --q;
  }
}

// Row pass for one row: out[u] = sqrt(min_k (u - k)^2 + g[k]^2). Picks the outward scan when
// its cost bound sum_j min(g[j], W) is small, else the O(W) lower envelope (Meijster).
template <class S>
void edt_row(const int32_t* g, int64_t W, EdtRowScratch& scratch, S* out) {
  constexpr int64_t kScanSteps = 4;  // per pixel, on average: ~ the envelope's cost
  int64_t scan_cost = 0;
  for (int64_t j = 0; j < W; ++j) scan_cost += std::min<int64_t>(g[j], W);
  if (scan_cost <= kScanSteps * W) {
    edt_row_scan(g, W, out);
    return;
  }
  edt_row_envelope(g, W, scratch, out);
}

template <class S>
void edt_fill_no_background(int64_t W, int64_t i, NoBackground mode, S* out) {
  for (int64_t j = 0; j < W; ++j) out[j] = edt_no_background_value<S>(mode, i, j);
}

}  // namespace cpu
}  // namespace geokernels
