// Local midpoint convexification (SPEC.md 1.6): the offset set D(r) and the per-pixel rules
// shared by the C++ CPU kernels and the CUDA kernels (csrc/cuda/midpoint.cu includes this file),
// so both evaluate the same comparisons in the same order. No ATen and no CUDA-only code here.
//
// D(r) = {(dy, dx) != 0 : dy^2 + dx^2 <= r^2}. It is symmetric (e in D <=> -e in D), and
// min(u(q-e), u(q+e)) does not depend on the sign of e, so a sweep only visits the K = |D|/2
// "pair" offsets n_0 < n_1 < ... < n_{K-1} of the negative half (dy < 0, or dy == 0 and dx < 0)
// in row-major order. The whole of D in row-major order is then n_0 .. n_{K-1}, -n_{K-1} .. -n_0,
// which is the order the source rule scans.
//
// Source rule (gradient routing; identical in geokernels/reference/midpoint.py): a pixel whose
// value did not rise keeps its source; a risen pixel q with new value v takes the source of
// q + e for the first e of D in row-major order with u(q + e) == v and u(q - e) >= v.
// Everything is comparisons and copies: results are exact in every dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "geokernels/common.h"

namespace geokernels {

// Largest accepted radius: |D| grows as pi r^2 and every plane is padded by floor(r).
constexpr double kMidpointMaxRadius = 1024.0;

// Sweep modes: the published Jacobi iteration, or the faster schedule of each backend that
// reaches the same fixed point.
enum class MidpointMode : int { Jacobi = 0, Fast = 1 };

struct MidpointOffset {
  int dy, dx;
};

// The K pair offsets n_k of D(radius) in row-major order (see above). floor(radius) is the reach.
inline std::vector<MidpointOffset> midpoint_pair_offsets(double radius) {
  std::vector<MidpointOffset> out;
  const int reach = static_cast<int>(std::floor(radius));
  const double r2 = radius * radius;
  for (int dy = -reach; dy <= 0; ++dy) {
    for (int dx = -reach; dx <= reach; ++dx) {
      if (dy == 0 && dx >= 0) break;
      if (static_cast<double>(dy * dy + dx * dx) <= r2) out.push_back({dy, dx});
    }
  }
  return out;
}

inline int midpoint_reach(double radius) { return static_cast<int>(std::floor(radius)); }

// The first offset e of D in row-major order with at(e) == v and at(-e) >= v, as an index into
// the row-major list of D: k for n_k, 2K-1-k for -n_k; -1 if none. `at(dy, dx)` reads the sweep
// input at q + (dy, dx) (zero outside the image). Called only for pixels whose value rose to v.
template <class S, class Reader>
GK_HD int midpoint_source_rank(const Reader& at, S v, const int* dy, const int* dx, int K) {
  for (int k = 0; k < K; ++k) {
    const S a = at(dy[k], dx[k]);
    if (a == v && at(-dy[k], -dx[k]) >= v) return k;
  }
  for (int k = K - 1; k >= 0; --k) {
    const S a = at(-dy[k], -dx[k]);
    if (a == v && at(dy[k], dx[k]) >= v) return 2 * K - 1 - k;
  }
  return -1;
}

// max_k min(at(n_k), at(-n_k)) folded into `best` (the scalar sweep of one pixel).
template <class S, class Reader>
GK_HD S midpoint_best(const Reader& at, S best, const int* dy, const int* dx, int K) {
  for (int k = 0; k < K; ++k) {
    const S a = at(dy[k], dx[k]);
    const S b = at(-dy[k], -dx[k]);
    const S m = b < a ? b : a;
    best = m > best ? m : best;
  }
  return best;
}

}  // namespace geokernels
