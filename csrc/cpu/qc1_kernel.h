// SIMD row-block kernels of qc1_loss (SPEC.md 1.3), written once and compiled twice: in
// qc1_loss.cpp for the baseline ISA and in qc1_loss_avx2.cpp for AVX2+FMA (picked at run time,
// see isa.h). GK_CPU_ISA names the namespace so the two copies never collide (ODR).
//
// A block is rows [r0, r1) of one (b, c) plane; blocks are fixed by shape only, so results are
// bit-identical for any thread count. Each block copies the rows it reads (its rows plus a
// window/2 halo) into zero-padded scratch: "u outside the image = 0" becomes plain loads, and
// nothing of size K = window^2 is ever stored (memory O(block), not O(K H W)).
// The math (pairing in the forward, the gather form of the backward) is in qc1_math.h.
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

// vec_shim.h first: the templated math must see the Vectorized overloads at definition time.
#include "vec_shim.h"

namespace geokernels {

// gk_mul_rn (see qc1_math.h) for at::vec::Vectorized: an empty asm that takes the product as
// an in/out register operand hides it from the optimiser, so it cannot be fused into an FMA.
#if defined(CPU_CAPABILITY_AVX2)
inline __m256 gk_opaque(__m256 r) {
  asm("" : "+x"(r));
  return r;
}
inline __m256d gk_opaque(__m256d r) {
  asm("" : "+x"(r));
  return r;
}
#endif

template <class S>
inline Vec<S> gk_mul_rn(const Vec<S>& a, const Vec<S>& b) {
  Vec<S> p = a * b;
#if defined(CPU_CAPABILITY_AVX2)
  return Vec<S>(gk_opaque(p));  // Vectorized<float|double> converts to __m256|__m256d
#else
  asm volatile("" : "+m"(p));  // generic: through memory (baseline x86-64 has no FMA anyway)
  return p;
#endif
}

}  // namespace geokernels

#include "geokernels/qc1_math.h"

#ifndef GK_CPU_ISA
#error "define GK_CPU_ISA before including qc1_kernel.h"
#endif

namespace geokernels {
namespace cpu {

// The kernels of one ISA build, as a table the dispatching translation unit can hold.
template <class S>
struct Qc1Fns {
  // Sum of the loss map over rows [r0, r1); writes the map rows if `map` is non-null.
  double (*forward_block)(const S* u, int64_t H, int64_t W, int64_t r0, int64_t r1, int window,
                          S* map);
  // grad u rows [r0, r1) of sum_q W(q) l(q), W = grad_map[q] or the scalar w_scalar; returns
  // sum of l(q) over the rows (free in this pass: the loss and its gradient in one go).
  double (*backward_block)(const S* u, const S* grad_map, S w_scalar, int64_t H, int64_t W,
                           int64_t r0, int64_t r1, int window, S* grad_u);
};
template <class S>
Qc1Fns<S> qc1_fns_avx2();  // defined in qc1_loss_avx2.cpp when GK_AVX2_COMPILED

namespace GK_CPU_ISA {

// One offset of the window with its unit direction.
template <class S>
struct Qc1Offset {
  int dy, dx;
  Qc1Direction<S> n;
};

// The offsets != 0 of a window in row-major order; `half` keeps one of each pair {d, -d}:
// those with dy > 0, or dy == 0 and dx > 0.
template <class S>
std::vector<Qc1Offset<S>> qc1_offset_table(int window, bool half) {
  const int r = window / 2;
  std::vector<Qc1Offset<S>> out;
  for (int dy = -r; dy <= r; ++dy) {
    for (int dx = -r; dx <= r; ++dx) {
      if (dy == 0 && dx == 0) continue;
      if (half && !(dy > 0 || (dy == 0 && dx > 0))) continue;
      out.push_back({dy, dx, qc1_direction<S>(dy, dx)});
    }
  }
  return out;
}

// Rows [first, first + rows) of a plane into zero-padded scratch of row pitch W + 2 pad.
template <class S>
inline void qc1_pad_rows(const S* u, int64_t H, int64_t W, int64_t first, int64_t rows,
                         int64_t pad, S* dst) {
  const int64_t pitch = W + 2 * pad;
  std::fill(dst, dst + rows * pitch, S(0));
  for (int64_t s = 0; s < rows; ++s) {
    const int64_t i = first + s;
    if (i < 0 || i >= H) continue;
    std::memcpy(dst + s * pitch + pad, u + i * W, static_cast<size_t>(W) * sizeof(S));
  }
}

// ux, uy of SPEC 1.1 ("prepend": 0 in the first column / row) for row i.
template <class S>
inline void qc1_diff_row(const S* u, int64_t W, int64_t i, S* ux, S* uy) {
  const S* rc = u + i * W;
  const S* rt = u + (i >= 1 ? i - 1 : i) * W;  // row 0: uy = u - u = 0
  ux[0] = S(0);
  for (int64_t j = 1; j < W; ++j) ux[j] = rc[j] - rc[j - 1];
  for (int64_t j = 0; j < W; ++j) uy[j] = rc[j] - rt[j];
}

template <class S>
double qc1_forward_block(const S* u, int64_t H, int64_t W, int64_t r0, int64_t r1, int window,
                         S* map) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const int64_t R = window / 2, pitch = W + 2 * R, rows = (r1 - r0) + 2 * R;
  const auto pairs = qc1_offset_table<S>(window, /*half=*/true);
  std::vector<S> scratch(static_cast<size_t>(rows * pitch + 2 * W), S(0));
  S* U = scratch.data();
  S* ux = U + rows * pitch;
  S* uy = ux + W;
  qc1_pad_rows(u, H, W, r0 - R, rows, R, U);
  double total = 0.0;
  for (int64_t i = r0; i < r1; ++i) {
    qc1_diff_row(u, W, i, ux, uy);
    const S* centre = U + (i - r0 + R) * pitch + R;
    S* out = map ? map + i * W : nullptr;
    V acc_row(S(0));
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      const V vx = V::loadu(ux + j, n), vy = V::loadu(uy + j, n), uc = V::loadu(centre + j, n);
      V acc(S(0));
      for (const auto& o : pairs) {
        const int64_t off = o.dy * pitch + o.dx;
        acc = acc + qc1_pair_value(vx, vy, uc, V::loadu(centre + j + off, n),
                                   V::loadu(centre + j - off, n), o.n);
      }
      if (out) acc.store(out + j, n);
      acc_row = acc_row + (n == VS ? acc : V::set(V(S(0)), acc, n));
    }
    S lanes[VS];
    acc_row.store(lanes);
    for (int64_t k = 0; k < VS; ++k) total += static_cast<double>(lanes[k]);
  }
  return total;
}

// Backward over one block: grad = T + Dx^T AX + Dy^T AY (qc1_math.h). AX and AY of row i+1 are
// needed for row i, so the main loop runs one extra row when the block is not the last.
// Returns the sum of the loss map over rows [r0, r1) (every sigmoid is evaluated here anyway).
template <class S>
double qc1_backward_block(const S* u, const S* grad_map, S w_scalar, int64_t H, int64_t W,
                        int64_t r0, int64_t r1, int window, S* grad_u) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const int64_t R = window / 2, pitch = W + 2 * R;
  const int64_t re = std::min<int64_t>(r1 + 1, H);  // main-loop rows [r0, re)
  const int64_t rows = (re - r0) + 2 * R;            // scratch rows r0 - R .. re - 1 + R
  const auto offsets = qc1_offset_table<S>(window, /*half=*/false);
  const int64_t plane = rows * pitch;
  std::vector<S> scratch(static_cast<size_t>(4 * plane + 6 * (W + 1)), S(0));
  S* U = scratch.data();
  S* UX = U + plane;
  S* UY = UX + plane;
  S* WW = UY + plane;  // upstream weight, 0 outside the image
  S* t_cur = WW + plane;
  S* t_prev = t_cur + (W + 1);
  S* ax_cur = t_prev + (W + 1);
  S* ax_prev = ax_cur + (W + 1);
  S* ay_cur = ax_prev + (W + 1);
  S* ay_prev = ay_cur + (W + 1);

  for (int64_t s = 0; s < rows; ++s) {
    const int64_t i = r0 - R + s;
    if (i < 0 || i >= H) continue;  // stays zero
    const int64_t o = s * pitch + R;
    std::memcpy(U + o, u + i * W, static_cast<size_t>(W) * sizeof(S));
    qc1_diff_row(u, W, i, UX + o, UY + o);
    if (grad_map) {
      std::memcpy(WW + o, grad_map + i * W, static_cast<size_t>(W) * sizeof(S));
    } else {
      std::fill(WW + o, WW + o + W, w_scalar);
    }
  }

  // grad row k from T_k, AX_k and AY_k, AY_{k+1}
  auto finish_row = [&](int64_t k, const S* t, S* ax, const S* ay, const S* ay_next) {
    ax[W] = S(0);
    S* g = grad_u + k * W;
    const S ax0 = ax[0];
    ax[0] = S(0);  // Dx^T drops the j = 0 entry
    const bool top = k >= 1;
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      V v = V::loadu(t + j, n) + V::loadu(ax + j, n) - V::loadu(ax + j + 1, n) -
            V::loadu(ay_next + j, n);
      if (top) v = v + V::loadu(ay + j, n);
      v.store(g + j, n);
    }
    ax[0] = ax0;
  };

  double value_total = 0.0;
  for (int64_t i = r0; i < re; ++i) {
    const int64_t s = i - r0 + R;
    V value_row(S(0));
    const S* uc_row = U + s * pitch + R;
    const S* uxc_row = UX + s * pitch + R;
    const S* uyc_row = UY + s * pitch + R;
    const S* wc_row = WW + s * pitch + R;
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      const V uc = V::loadu(uc_row + j, n), uxc = V::loadu(uxc_row + j, n);
      const V uyc = V::loadu(uyc_row + j, n), wc = V::loadu(wc_row + j, n);
      Qc1GradAcc<V> acc{V(S(0)), V(S(0)), V(S(0)), V(S(0))};
      for (const auto& o : offsets) {
        const int64_t off = o.dy * pitch + o.dx + j;
        const V a_c = qc1_alignment(uxc, uyc, o.n);
        const V a_n = qc1_alignment(V::loadu(uxc_row + off, n), V::loadu(uyc_row + off, n), o.n);
        qc1_grad_accumulate(acc, uc, V::loadu(uc_row + off, n), a_c, a_n, wc,
                            V::loadu(wc_row + off, n), o.n);
      }
      acc.t.store(t_cur + j, n);
      (V(S(0)) - wc * acc.sx).store(ax_cur + j, n);
      (V(S(0)) - wc * acc.sy).store(ay_cur + j, n);
      value_row = value_row + (n == VS ? acc.value : V::set(V(S(0)), acc.value, n));
    }
    if (i < r1) {  // not the extra row
      S lanes[VS];
      value_row.store(lanes);
      for (int64_t k = 0; k < VS; ++k) value_total += static_cast<double>(lanes[k]);
    }
    if (i > r0) finish_row(i - 1, t_prev, ax_prev, ay_prev, ay_cur);
    std::swap(t_cur, t_prev);
    std::swap(ax_cur, ax_prev);
    std::swap(ay_cur, ay_prev);
  }
  if (re == r1) {  // last block of the plane: row H-1 has AY_{H} = 0
    std::fill(ay_cur, ay_cur + W + 1, S(0));
    finish_row(r1 - 1, t_prev, ax_prev, ay_prev, ay_cur);
  }
  return value_total;
}

}  // namespace GK_CPU_ISA
}  // namespace cpu
}  // namespace geokernels
