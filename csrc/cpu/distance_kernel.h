// CPU kernels of the exact Euclidean distance transform (SPEC.md 2.1-2.2): two separable passes.
//
// Column pass: g[i,j] = |i - k| for the nearest target pixel k in column j (a down sweep and an
// up sweep, run row by row over a block of columns so the inner loop is contiguous and
// vectorises). Row pass: d^2[i,j] = min_k (j - k)^2 + g[i,k]^2, per row either by the lower
// envelope of parabolas (Meijster et al., O(W)) or, where the column distances are small, by the
// cheaper outward scan (see distance_math.h). All in int64, so the result is exact.
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

// Row pass for one row by the outward scan (cheap where column distances are small: a zero
// pixel costs one read).
template <class S>
void edt_row_scan(const int32_t* g, int64_t W, S* out) {
  for (int64_t j = 0; j < W; ++j)
    out[j] = g[j] == 0 ? S(0) : edt_from_squared<S>(edt_row_min_scan(g, W, j));
}

// Row pass for one row by the lower envelope of parabolas, O(W).
template <class S>
void edt_row_envelope(const int32_t* g, int64_t W, EdtRowScratch& scratch, S* out) {
  const int32_t* s = scratch.s.data();
  const int32_t* t = scratch.t.data();
  int64_t q = edt_envelope(g, W, scratch.s.data(), scratch.t.data()) - 1;
  for (int64_t u = W - 1; u >= 0; --u) {
    out[u] = edt_from_squared<S>(edt_parabola(g, u, s[q]));
    if (u == t[q]) --q;
  }
}

// Row pass for one row: out[u] = sqrt(min_k (u - k)^2 + g[k]^2). Picks the outward scan when
// its cost bound sum_j min(g[j], W) is small, else the O(W) lower envelope (Meijster).
template <class S>
void edt_row(const int32_t* g, int64_t W, EdtRowScratch& scratch, S* out) {
  int64_t scan_cost = 0;
  for (int64_t j = 0; j < W; ++j) scan_cost += std::min<int64_t>(g[j], W);
  if (scan_cost <= kEdtScanStepsPerPixel * W) {
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
