// SIMD row-block kernels of qc2_loss (SPEC.md 1.2), written once and compiled twice: in
// qc_loss.cpp for the baseline ISA and in qc_loss_avx2.cpp for AVX2+FMA (the caller picks one at
// run time). GK_CPU_ISA names the namespace so the two copies never collide (ODR).
//
// A block is rows [r0, r1) of one (b, c) plane. Blocks are fixed by shape only, so sums and
// gradients are bit-identical run to run and for any number of threads.
#pragma once

#include <algorithm>
#include <vector>

// vec_shim.h first: the templated math must see the Vectorized overloads at definition time.
#include "vec_shim.h"
#include "geokernels/qc2_math.h"

#ifndef GK_CPU_ISA
#error "define GK_CPU_ISA before including qc2_kernel.h"
#endif

namespace geokernels {
namespace cpu {

// The kernels of one ISA build, as a table the dispatching translation unit can hold.
template <class S>
struct Qc2Fns {
  double (*forward_block)(const S*, int64_t, int64_t, int64_t, int64_t, const Qc2Params<S>&, S*);
  void (*backward_block)(const S*, const S*, S, int64_t, int64_t, int64_t, int64_t,
                         const Qc2Params<S>&, S*);
};
template <class S>
Qc2Fns<S> qc2_fns_avx2();  // defined in qc_loss_avx2.cpp when GK_AVX2_COMPILED

namespace GK_CPU_ISA {

template <class S>
inline S qc2_scalar_value(const S* u, int64_t W, int64_t i, int64_t j, const Qc2Params<S>& p) {
  const S* rc = u + i * W;
  const S* rt = u + gk_clamp_low(i - 1) * W;
  const S* rtt = u + gk_clamp_low(i - 2) * W;
  const int64_t j1 = gk_clamp_low(j - 1), j2 = gk_clamp_low(j - 2);
  return qc2_value(qc2_stencil<S>(rc[j], rc[j1], rc[j2], rt[j], rtt[j], rt[j1]), p);
}

// Forward over one block; writes the loss map if `map` is non-null and returns the block sum.
template <class S>
double qc2_forward_block(const S* u, int64_t H, int64_t W, int64_t r0, int64_t r1,
                         const Qc2Params<S>& p, S* map) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  double total = 0.0;
  for (int64_t i = r0; i < r1; ++i) {
    const S* rc = u + i * W;
    const S* rt = u + gk_clamp_low(i - 1) * W;
    const S* rtt = u + gk_clamp_low(i - 2) * W;
    S* out = map ? map + i * W : nullptr;
    S head = 0;
    const int64_t jv = std::min<int64_t>(2, W);
    for (int64_t j = 0; j < jv; ++j) {  // columns 0, 1: clamped stencil
      const S v = qc2_scalar_value(u, W, i, j, p);
      if (out) out[j] = v;
      head += v;
    }
    V acc(S(0));
    for (int64_t j = jv; j < W; j += VS) {
      const int64_t n = std::min<int64_t>(VS, W - j);
      const V v = qc2_value(
          qc2_stencil(V::loadu(rc + j, n), V::loadu(rc + j - 1, n), V::loadu(rc + j - 2, n),
                      V::loadu(rt + j, n), V::loadu(rtt + j, n), V::loadu(rt + j - 1, n)),
          p);
      if (out) v.store(out + j, static_cast<int>(n));
      acc = acc + (n == VS ? v : V::set(V(S(0)), v, n));
    }
    S lanes[VS];
    acc.store(lanes);
    double row = static_cast<double>(head);
    for (int64_t k = 0; k < VS; ++k) row += static_cast<double>(lanes[k]);
    total += row;
  }
  return total;
}

// Backward over one block. The gradient of sum_q w_q l_q is assembled through the adjoints of
// the difference operators (Dx^T g[k] = [k>=1] g[k] - g[k+1]):
//   GUX = a_x + Dx^T a_xx + Dy^T (a_m / 2),  GUY = a_y + Dy^T a_yy + Dx^T (a_m / 2)
//   grad u = Dx^T GUX + Dy^T GUY
// Per-pixel partials are computed once for rows r0 .. r1+1 into block-local scratch (one extra
// zero row and column stand for "outside the image"). w is grad_map[q] or the scalar w_scalar.
template <class S>
void qc2_backward_block(const S* u, const S* grad_map, S w_scalar, int64_t H, int64_t W,
                        int64_t r0, int64_t r1, const Qc2Params<S>& p, S* grad_u) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const int64_t LD = W + 1;
  const int64_t P = std::min<int64_t>(r1 + 2, H) - r0;  // partial rows r0 .. r0+P-1
  std::vector<S> scratch(static_cast<size_t>(5 * (P + 1) * LD + 3 * LD), S(0));
  S* AX = scratch.data();
  S* AY = AX + (P + 1) * LD;
  S* AXX = AY + (P + 1) * LD;
  S* AYY = AXX + (P + 1) * LD;
  S* AM2 = AYY + (P + 1) * LD;
  S* guy_cur = AM2 + (P + 1) * LD;
  S* guy_next = guy_cur + LD;
  S* gux = guy_next + LD;

  for (int64_t r = 0; r < P; ++r) {
    const int64_t i = r0 + r;
    const S* rc = u + i * W;
    const S* rt = u + gk_clamp_low(i - 1) * W;
    const S* rtt = u + gk_clamp_low(i - 2) * W;
    const S* wr = grad_map ? grad_map + i * W : nullptr;
    S* ax = AX + r * LD; S* ay = AY + r * LD; S* axx = AXX + r * LD;
    S* ayy = AYY + r * LD; S* am2 = AM2 + r * LD;
    const int64_t jv = std::min<int64_t>(2, W);
    for (int64_t j = 0; j < jv; ++j) {
      const int64_t j1 = gk_clamp_low(j - 1), j2 = gk_clamp_low(j - 2);
      const Qc2Partials<S> d = qc2_partials(
          qc2_stencil<S>(rc[j], rc[j1], rc[j2], rt[j], rtt[j], rt[j1]), p, wr ? wr[j] : w_scalar);
      ax[j] = d.ax; ay[j] = d.ay; axx[j] = d.axx; ayy[j] = d.ayy; am2[j] = d.am * S(0.5);
    }
    for (int64_t j = jv; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      const V w = wr ? V::loadu(wr + j, n) : V(w_scalar);
      const Qc2Partials<V> d = qc2_partials(
          qc2_stencil(V::loadu(rc + j, n), V::loadu(rc + j - 1, n), V::loadu(rc + j - 2, n),
                      V::loadu(rt + j, n), V::loadu(rtt + j, n), V::loadu(rt + j - 1, n)),
          p, w);
      d.ax.store(ax + j, n); d.ay.store(ay + j, n); d.axx.store(axx + j, n);
      d.ayy.store(ayy + j, n); (d.am * V(S(0.5))).store(am2 + j, n);
    }
  }

  // GUY row (local r): AY + AYY[r] - AYY[r+1] + [j>=1] AM2[r][j] - AM2[r][j+1]
  auto make_guy = [&](int64_t r, S* dst) {
    const S* ay = AY + r * LD; const S* ayy = AYY + r * LD; const S* ayy1 = ayy + LD;
    const S* am2 = AM2 + r * LD;
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      V v = V::loadu(ay + j, n) + V::loadu(ayy + j, n) - V::loadu(ayy1 + j, n) +
            V::loadu(am2 + j, n) - V::loadu(am2 + j + 1, n);
      v.store(dst + j, n);
    }
    dst[0] -= am2[0];  // Dx^T drops the j = 0 entry of a_m / 2
    dst[W] = S(0);
  };

  make_guy(0, guy_cur);
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t r = i - r0;
    if (i + 1 < H) {
      make_guy(r + 1, guy_next);
    } else {
      std::fill(guy_next, guy_next + LD, S(0));
    }
    // GUX row: AX + AXX[j] - AXX[j+1] + [i>=1] AM2[r][j] - AM2[r+1][j]
    const S* axr = AX + r * LD; const S* axx = AXX + r * LD;
    const S* am2 = AM2 + r * LD; const S* am2n = am2 + LD;
    const bool top = i >= 1;
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      V v = V::loadu(axr + j, n) + V::loadu(axx + j, n) - V::loadu(axx + j + 1, n) -
            V::loadu(am2n + j, n);
      if (top) v = v + V::loadu(am2 + j, n);
      v.store(gux + j, n);
    }
    gux[0] = S(0);  // Dx^T drops the j = 0 entry
    gux[W] = S(0);
    // grad row: GUX[j] - GUX[j+1] + [i>=1] GUY[i][j] - GUY[i+1][j]
    S* g = grad_u + i * W;
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      V v = V::loadu(gux + j, n) - V::loadu(gux + j + 1, n) - V::loadu(guy_next + j, n);
      if (top) v = v + V::loadu(guy_cur + j, n);
      v.store(g + j, n);
    }
    std::swap(guy_cur, guy_next);
  }
}

}  // namespace GK_CPU_ISA
}  // namespace cpu
}  // namespace geokernels
