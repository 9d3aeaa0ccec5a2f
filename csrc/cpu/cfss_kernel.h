// SIMD row-block kernels of the unrolled CFSS iterations (SPEC.md 2.4), compiled twice like
// qc2_kernel.h (baseline in cfss.cpp, AVX2+FMA in cfss_avx2.cpp).
//
// One iteration maps the state (u, q) of a plane to the next state. A block is rows [r0, r1);
// it recomputes what it needs from the rows around it (the Gaussian's h rows above and below,
// one row of q above for div^-), so blocks are independent and every pixel is computed the same
// way whatever the blocking and thread count (deterministic results).
//
// Reverse step (the hand-written adjoint of one iteration t, see cfss.cpp for the driver). With
// A = dL/dz_t, gq = dL/dq_t (from later iterations), u, q = the state before iteration t:
//   g_m      = grad+ A / eps               (m = T q; D = div^-(m) = -(grad+)^T m)
//   gq      += <T, g_m>;   gq~ = gq [q~ > 0] (q_nonneg)   -> dL/dq_{t-1}
//   g_r      = -tau gq~                    (r = <grad+ u, T>)
//   g_T     += q_t g_m + g_r grad+ u
//   g_u      = -div^-(T g_r) + (2 lam / eps) k * A
//   dL/dz_{t-1} = g_u u (1 - u)
// and the scalar sums  sum z A (eps),  sum r gq~ (tau),  sum p A (lam),
//   sum (dw *_y A)(w *_x v) + (w *_y A)(dw *_x v)  (sigma; v = 1 - 2u, zero outside).
#pragma once

#include <algorithm>
#include <vector>

#include "vec_shim.h"
#include "geokernels/cfss_math.h"
#include "geokernels/contour_flow_math.h"

#ifndef GK_CPU_ISA
#error "define GK_CPU_ISA before including cfss_kernel.h"
#endif

namespace geokernels {
namespace cpu {

// One plane's constant inputs and the scalar parameters of a call.
template <class S>
struct CfssPlane {
  const S* o;
  const S* T0;
  const S* T1;
  int64_t H, W;
  S eps, tau, lam;
  const S* w;   // 2h+1 normalised 1-D Gaussian taps
  const S* dw;  // their derivative in sigma
  int h;
  bool nonneg;
};

// Slots of the per-block scalar sums (doubles, accumulated over all reverse steps).
enum CfssSum : int { kSumZA = 0, kSumRG = 1, kSumPA = 2, kSumSigma = 3, kNumSums = 4 };

template <class S>
struct CfssFns {
  void (*init_block)(const CfssPlane<S>&, int64_t, int64_t, S*, S*);
  void (*forward_block)(const CfssPlane<S>&, const S*, const S*, int64_t, int64_t, S*, S*, S*);
  void (*backward_block)(const CfssPlane<S>&, const S*, const S*, const S*, const S*, int64_t,
                         int64_t, S*, S*, S*, S*, S*, double*);
  void (*finish_block)(const CfssPlane<S>&, const S*, int64_t, int64_t, S*, double*);
};
template <class S>
CfssFns<S> cfss_fns_avx2();  // cfss_avx2.cpp

namespace GK_CPU_ISA {

template <class S>
inline double hsum(const Vec<S>& v) {
  S lanes[Vec<S>::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t k = 0; k < Vec<S>::size(); ++k) s += static_cast<double>(lanes[k]);
  return s;
}

// row[j + 1] for the lanes j .. j+n-1, with 0 right of the image (zero padding)
template <class S>
inline Vec<S> load_right(const S* row, int64_t j, int64_t W) {
  return Vec<S>::loadu(row + j + 1, std::min<int64_t>(Vec<S>::size(), W - 1 - j));
}

// vpad = [0]*h + (1 - 2 u_row) + [0]*h
template <class S>
inline void make_vpad(const S* urow, int64_t W, int h, S* vpad) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  std::fill(vpad, vpad + h, S(0));
  std::fill(vpad + h + W, vpad + W + 2 * h, S(0));
  for (int64_t j = 0; j < W; j += VS) {
    const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
    (V(S(1)) - V(S(2)) * V::loadu(urow + j, n)).store(vpad + h + j, n);
  }
}

// out[j] = sum_b taps[b] * pad[j + b], j in [0, W)   (a 1-D correlation of a padded row)
template <class S>
inline void hpass(const S* pad, int64_t W, const S* taps, int h, S* out) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  for (int64_t j = 0; j < W; j += VS) {
    const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
    V acc = V(taps[0]) * V::loadu(pad + j, n);
    for (int b = 1; b <= 2 * h; ++b) acc = acc + V(taps[b]) * V::loadu(pad + j + b, n);
    acc.store(out + j, n);
  }
}

// hx rows for image rows [r0 - h, r1 + h) (zero rows outside the image): hx = w *_x v
template <class S>
inline void hx_rows(const CfssPlane<S>& P, const S* u, int64_t r0, int64_t r1, S* hx, S* vpad) {
  const int64_t W = P.W;
  for (int64_t rr = r0 - P.h; rr < r1 + P.h; ++rr) {
    S* dst = hx + (rr - (r0 - P.h)) * W;
    if (rr < 0 || rr >= P.H) {
      std::fill(dst, dst + W, S(0));
      continue;
    }
    make_vpad(u + rr * W, W, P.h, vpad);
    hpass(vpad, W, P.w, P.h, dst);
  }
}

// u0 = sigmoid(o / eps), q0 = 0
template <class S>
void cfss_init_block(const CfssPlane<S>& P, int64_t r0, int64_t r1, S* u, S* q) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const int64_t W = P.W;
  for (int64_t i = r0; i < r1; ++i) {
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      gk_sigmoid(V::loadu(P.o + i * W + j, n) / V(P.eps)).store(u + i * W + j, n);
    }
    std::fill(q + i * W, q + (i + 1) * W, S(0));
  }
}

// One iteration on rows [r0, r1): (u, q) -> (u_next, q_next), or z_out on the last iteration
// (u_next / q_next may then be null).
template <class S>
void cfss_forward_block(const CfssPlane<S>& P, const S* u, const S* q, int64_t r0, int64_t r1,
                        S* u_next, S* q_next, S* z_out) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const int64_t H = P.H, W = P.W;
  const int h = P.h;
  const int64_t nhx = (r1 - r0) + 2 * h;
  std::vector<S> scratch(static_cast<size_t>(nhx * W + (W + 2 * h) + 4 * (W + 1) + W), S(0));
  S* hx = scratch.data();
  S* vpad = hx + nhx * W;
  S* m0_prev = vpad + (W + 2 * h);  // T0 q_t of row i - 1 (zero above the image)
  S* m0_cur = m0_prev + (W + 1);
  S* m1 = m0_cur + (W + 1);         // [0] = 0 (column -1), T1 q_t of row i at [1 + j]
  S* zrow = m1 + (W + 1);           // a zero row (below the image)
  hx_rows(P, u, r0, r1, hx, vpad);
  const V tau(P.tau), lam(P.lam), eps(P.eps), zero(S(0));

  for (int64_t i = std::max<int64_t>(r0 - 1, 0); i < r1; ++i) {
    const bool own = i >= r0;
    const S* ui = u + i * W;
    const S* ud = i + 1 < H ? u + (i + 1) * W : zrow;
    const S* t0 = P.T0 + i * W;
    const S* t1 = P.T1 + i * W;
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      const V uc = V::loadu(ui + j, n);
      const V d0 = V::loadu(ud + j, n) - uc;
      const V d1 = load_right(ui, j, W) - uc;
      const V T0 = V::loadu(t0 + j, n), T1 = V::loadu(t1 + j, n);
      V qn = V::loadu(q + i * W + j, n) - tau * (T0 * d0 + T1 * d1);
      if (P.nonneg) qn = gk_max(qn, zero);
      if (own && q_next) qn.store(q_next + i * W + j, n);
      (T0 * qn).store(m0_cur + j, n);
      (T1 * qn).store(m1 + 1 + j, n);
    }
    if (own) {
      const S* hxr = hx + (i - r0) * W;  // hx rows i - h .. i + h
      for (int64_t j = 0; j < W; j += VS) {
        const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
        V p = V(P.w[0]) * V::loadu(hxr + j, n);
        for (int a = 1; a <= 2 * h; ++a) p = p + V(P.w[a]) * V::loadu(hxr + a * W + j, n);
        const V D = (V::loadu(m0_cur + j, n) - V::loadu(m0_prev + j, n)) +
                    (V::loadu(m1 + 1 + j, n) - V::loadu(m1 + j, n));
        const V z = (V::loadu(P.o + i * W + j, n) - lam * p - D) / eps;
        if (z_out) z.store(z_out + i * W + j, n);
        else gk_sigmoid(z).store(u_next + i * W + j, n);
      }
    }
    std::swap(m0_prev, m0_cur);
  }
}

// The reverse of iteration t on rows [r0, r1) (see the header comment). gq_in may be null
// (t = iters). Accumulates g_o_acc += A (scaled by 1/eps at the end), g_T0, g_T1, sums[4].
template <class S>
void cfss_backward_block(const CfssPlane<S>& P, const S* u, const S* q, const S* A,
                         const S* gq_in, int64_t r0, int64_t r1, S* A_prev, S* gq_out,
                         S* g_o_acc, S* g_T0, S* g_T1, double* sums) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const int64_t H = P.H, W = P.W;
  const int h = P.h;
  const int64_t nhx = (r1 - r0) + 2 * h;
  const int64_t LP = W + 2 * h;
  std::vector<S> scratch(static_cast<size_t>(nhx * W + 2 * LP + 7 * (W + 1) + W + W), S(0));
  S* hx = scratch.data();
  S* vpad = hx + nhx * W;
  S* lypad = vpad + LP;              // [0]*h + (w *_y A)(row i) + [0]*h
  S* m0_prev = lypad + LP;
  S* m0_cur = m0_prev + (W + 1);
  S* m1 = m0_cur + (W + 1);          // [0] = 0, T1 q_t at [1 + j]
  S* n0_prev = m1 + (W + 1);
  S* n0_cur = n0_prev + (W + 1);
  S* n1 = n0_cur + (W + 1);          // [0] = 0, T1 g_r at [1 + j]
  S* spare = n1 + (W + 1);
  S* zrow = spare + (W + 1);         // zero row
  S* hxd = zrow + W;                 // dw *_x v of row i
  hx_rows(P, u, r0, r1, hx, vpad);
  const V tau(P.tau), lam(P.lam), eps(P.eps), zero(S(0)), one(S(1));
  const V two_lam_eps = V(S(2)) * lam / eps;
  (void)spare;
  double s_za = 0.0, s_rg = 0.0, s_pa = 0.0, s_sig = 0.0;

  for (int64_t i = std::max<int64_t>(r0 - 1, 0); i < r1; ++i) {
    const bool own = i >= r0;
    const S* ui = u + i * W;
    const S* ud = i + 1 < H ? u + (i + 1) * W : zrow;
    const S* Ai = A + i * W;
    const S* Ad = i + 1 < H ? A + (i + 1) * W : zrow;
    const S* t0 = P.T0 + i * W;
    const S* t1 = P.T1 + i * W;
    V acc_rg(S(0));
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      const V uc = V::loadu(ui + j, n);
      const V d0 = V::loadu(ud + j, n) - uc;
      const V d1 = load_right(ui, j, W) - uc;
      const V T0 = V::loadu(t0 + j, n), T1 = V::loadu(t1 + j, n);
      const V r = T0 * d0 + T1 * d1;
      const V qtil = V::loadu(q + i * W + j, n) - tau * r;
      const V qt = P.nonneg ? gk_max(qtil, zero) : qtil;
      const V Ac = V::loadu(Ai + j, n);
      const V gm0 = (V::loadu(Ad + j, n) - Ac) / eps;
      const V gm1 = (load_right(Ai, j, W) - Ac) / eps;
      V gq = T0 * gm0 + T1 * gm1;
      if (gq_in) gq = V::loadu(gq_in + i * W + j, n) + gq;
      if (P.nonneg) gq = gk_select(gk_gt(qtil, zero), gq, zero);
      const V gr = zero - tau * gq;
      (T0 * qt).store(m0_cur + j, n);
      (T1 * qt).store(m1 + 1 + j, n);
      (T0 * gr).store(n0_cur + j, n);
      (T1 * gr).store(n1 + 1 + j, n);
      if (own) {
        gq.store(gq_out + i * W + j, n);
        (V::loadu(g_T0 + i * W + j, n) + qt * gm0 + gr * d0).store(g_T0 + i * W + j, n);
        (V::loadu(g_T1 + i * W + j, n) + qt * gm1 + gr * d1).store(g_T1 + i * W + j, n);
        acc_rg = acc_rg + r * gq;  // tail lanes: r = 0 (zero-filled loads)
      }
    }
    if (own) {
      s_rg += hsum(acc_rg);
      // (w *_y A) and (dw *_y A) of row i: rows i - h .. i + h, zero outside the image
      std::fill(lypad, lypad + h, S(0));
      std::fill(lypad + h + W, lypad + LP, S(0));
      make_vpad(ui, W, h, vpad);
      hpass(vpad, W, P.dw, h, hxd);
      const S* hxr = hx + (i - r0) * W;
      V acc_za(S(0)), acc_pa(S(0)), acc_sig(S(0));
      for (int64_t j = 0; j < W; j += VS) {
        const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
        V ly(S(0)), lyd(S(0));
        for (int a = 0; a <= 2 * h; ++a) {
          const int64_t rr = i - h + a;
          if (rr < 0 || rr >= H) continue;
          const V Ar = V::loadu(A + rr * W + j, n);
          ly = ly + V(P.w[a]) * Ar;
          lyd = lyd + V(P.dw[a]) * Ar;
        }
        ly.store(lypad + h + j, n);
        acc_sig = acc_sig + lyd * V::loadu(hxr + h * W + j, n) + ly * V::loadu(hxd + j, n);
      }
      for (int64_t j = 0; j < W; j += VS) {
        const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
        V p = V(P.w[0]) * V::loadu(hxr + j, n);
        for (int a = 1; a <= 2 * h; ++a) p = p + V(P.w[a]) * V::loadu(hxr + a * W + j, n);
        const V D = (V::loadu(m0_cur + j, n) - V::loadu(m0_prev + j, n)) +
                    (V::loadu(m1 + 1 + j, n) - V::loadu(m1 + j, n));
        const V z = (V::loadu(P.o + i * W + j, n) - lam * p - D) / eps;
        const V Ac = V::loadu(Ai + j, n);
        acc_za = acc_za + z * Ac;
        acc_pa = acc_pa + p * Ac;
        V gv = V(P.w[0]) * V::loadu(lypad + j, n);
        for (int b = 1; b <= 2 * h; ++b) gv = gv + V(P.w[b]) * V::loadu(lypad + j + b, n);
        const V ndiv = (V::loadu(n0_cur + j, n) - V::loadu(n0_prev + j, n)) +
                       (V::loadu(n1 + 1 + j, n) - V::loadu(n1 + j, n));
        const V gu = two_lam_eps * gv - ndiv;
        const V uc = V::loadu(ui + j, n);
        (gu * uc * (one - uc)).store(A_prev + i * W + j, n);
        (V::loadu(g_o_acc + i * W + j, n) + Ac).store(g_o_acc + i * W + j, n);
      }
      s_za += hsum(acc_za);
      s_pa += hsum(acc_pa);
      s_sig += hsum(acc_sig);
    }
    std::swap(m0_prev, m0_cur);
    std::swap(n0_prev, n0_cur);
  }
  sums[kSumZA] += s_za;
  sums[kSumRG] += s_rg;
  sums[kSumPA] += s_pa;
  sums[kSumSigma] += s_sig;
}

// The initial state's share: u0 = sigmoid(z0), z0 = o / eps. A0 = dL/dz0.
template <class S>
void cfss_finish_block(const CfssPlane<S>& P, const S* A0, int64_t r0, int64_t r1, S* g_o_acc,
                       double* sums) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const int64_t W = P.W;
  double s = 0.0;
  for (int64_t i = r0; i < r1; ++i) {
    V acc(S(0));
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      const V Ac = V::loadu(A0 + i * W + j, n);
      acc = acc + (V::loadu(P.o + i * W + j, n) / V(P.eps)) * Ac;
      (V::loadu(g_o_acc + i * W + j, n) + Ac).store(g_o_acc + i * W + j, n);
    }
    s += hsum(acc);
  }
  sums[kSumZA] += s;
}

}  // namespace GK_CPU_ISA
}  // namespace cpu
}  // namespace geokernels
