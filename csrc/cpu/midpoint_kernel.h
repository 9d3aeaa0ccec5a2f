// SIMD tile kernel of midpoint convexification (SPEC.md 1.6), written once and compiled twice:
// in midpoint.cpp for the baseline ISA and in midpoint_avx2.cpp for AVX2 (picked at run time,
// see isa.h). GK_CPU_ISA names the namespace so the two copies never collide (ODR).
//
// Planes live in zero-padded buffers (reach = floor(r) rows/columns of zeros on every side, plus
// kMidpointSlack spare columns on the right so a vector chunk may run past the last column), so
// the inner loop has no border tests: pixel (i, j) of a plane is origin[i * ld + j], and the pair
// offsets are linear (dy * ld + dx). Only max/min/compare/copy: results are exact in any ISA.
#pragma once

#include <algorithm>
#include <cstdint>

// vec_shim.h first (at::vec types); midpoint_common.h holds the scalar rules shared with CUDA.
#include "vec_shim.h"
#include "midpoint_common.h"

#ifndef GK_CPU_ISA
#error "define GK_CPU_ISA before including midpoint_kernel.h"
#endif

namespace geokernels {
namespace cpu {

// Spare columns right of every padded row: >= the widest vector chunk (4 vectors) of any dtype.
constexpr int64_t kMidpointSlack = 32;

// The pair offsets n_k of D(r) (midpoint_common.h) for one padded row stride.
struct MidpointPairs {
  int K;
  const int64_t* linear;  // dy * ld + dx
  const int* dy;
  const int* dx;
};

struct MidpointTileOutcome {
  double max_change;  // max over the tile of (u' - u), computed in the dtype (as the SPEC loop)
  bool changed;       // some value rose
};

// One tile of the image: plane buffers, the tile's rows/columns, and the schedule.
template <class S>
struct MidpointTile {
  const S* in;            // origin of the sweep input (pixel (0, 0))
  S* out;                 // origin of the sweep output; == in for an in-place (fast) pass
  const int64_t* src_in;  // sources of `in` (same layout, -1 padding) or nullptr: no tracking
  int64_t* src_out;
  int64_t ld;
  int64_t i0, i1, j0, j1;  // rows [i0, i1), columns [j0, j1)
  bool reverse;            // visit rows bottom-up and chunks right-to-left (in-place passes)
};

template <class S>
struct MidpointFns {
  MidpointTileOutcome (*tile)(const MidpointTile<S>&, const MidpointPairs&);
};
template <class S>
MidpointFns<S> midpoint_fns_avx2();  // defined in midpoint_avx2.cpp when GK_AVX2_COMPILED

namespace GK_CPU_ISA {

// One sweep over one tile. Every chunk of 4 vectors is read completely (values, and for a risen
// pixel its source scan) before any of it is written, so an in-place pass sees a well-defined
// mix of old and new values: chunks already visited in this pass are new, the rest old.
template <class S>
MidpointTileOutcome midpoint_tile(const MidpointTile<S>& t, const MidpointPairs& pairs) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  constexpr int64_t CH = 4 * VS;
  static_assert(CH <= kMidpointSlack, "vector chunk wider than the row slack");
  const int K = pairs.K;
  const int64_t* lin = pairs.linear;
  double max_change = 0.0;
  bool changed = false;
  S best[CH];
  int64_t new_src[CH];
  const int64_t n_rows = t.i1 - t.i0;
  const int64_t n_chunks = (t.j1 - t.j0 + CH - 1) / CH;
  for (int64_t ri = 0; ri < n_rows; ++ri) {
    const int64_t i = t.reverse ? t.i1 - 1 - ri : t.i0 + ri;
    for (int64_t ci = 0; ci < n_chunks; ++ci) {
      const int64_t jc = t.j0 + (t.reverse ? n_chunks - 1 - ci : ci) * CH;
      const int64_t n = std::min<int64_t>(CH, t.j1 - jc);
      const int64_t q0 = i * t.ld + jc;
      const S* p = t.in + q0;
      V b0 = V::loadu(p), b1 = V::loadu(p + VS), b2 = V::loadu(p + 2 * VS), b3 = V::loadu(p + 3 * VS);
      for (int k = 0; k < K; ++k) {
        const S* a = p + lin[k];
        const S* c = p - lin[k];
        // max(best, min(u(q + n_k), u(q - n_k))): clamp_min/clamp_max are single max/min ops
        b0 = at::vec::clamp_min(b0, at::vec::clamp_max(V::loadu(a), V::loadu(c)));
        b1 = at::vec::clamp_min(b1, at::vec::clamp_max(V::loadu(a + VS), V::loadu(c + VS)));
        b2 = at::vec::clamp_min(b2, at::vec::clamp_max(V::loadu(a + 2 * VS), V::loadu(c + 2 * VS)));
        b3 = at::vec::clamp_min(b3, at::vec::clamp_max(V::loadu(a + 3 * VS), V::loadu(c + 3 * VS)));
      }
      b0.store(best);
      b1.store(best + VS);
      b2.store(best + 2 * VS);
      b3.store(best + 3 * VS);
      for (int64_t l = 0; l < n; ++l) {
        const S old = p[l];
        const S v = best[l];
        if (v > old) {
          const S change = v - old;
          max_change = std::max(max_change, static_cast<double>(change));
          changed = true;
          if (t.src_in) {
            const S* q = p + l;
            const int64_t ld = t.ld;
            auto at = [q, ld](int dy, int dx) { return q[dy * ld + dx]; };
            const int rank = midpoint_source_rank<S>(at, v, pairs.dy, pairs.dx, K);
            // rank >= 0 always: the pair that produced v realises it (see midpoint_common.h)
            int64_t e = 0;
            if (rank >= 0) e = rank < K ? lin[rank] : -lin[2 * K - 1 - rank];
            new_src[l] = t.src_in[q0 + l + e];
          }
        } else if (t.src_in) {
          new_src[l] = t.src_in[q0 + l];
        }
      }
      S* o = t.out + q0;
      for (int64_t l = 0; l < n; ++l) o[l] = best[l];
      if (t.src_in) {
        int64_t* so = t.src_out + q0;
        for (int64_t l = 0; l < n; ++l) so[l] = new_src[l];
      }
    }
  }
  return {max_change, changed};
}

}  // namespace GK_CPU_ISA
}  // namespace cpu
}  // namespace geokernels
