// SIMD row-block kernels of contour_flow_loss (SPEC.md 2.3), written once and compiled twice:
// in contour_flow.cpp for the baseline ISA and in contour_flow_avx2.cpp for AVX2+FMA (isa.h).
// A block is rows [r0, r1) of one (b, c) plane; blocks are fixed by shape only, so sums and
// gradients are bit-identical for any number of threads.
#pragma once

#include <algorithm>
#include <vector>

#include "vec_shim.h"
#include "geokernels/contour_flow_math.h"

#ifndef GK_CPU_ISA
#error "define GK_CPU_ISA before including contour_flow_kernel.h"
#endif

namespace geokernels {
namespace cpu {

template <class S>
struct CflFns {
  double (*forward_block)(const S*, const S*, const S*, int64_t, int64_t, int64_t, int64_t, S, S*);
  void (*backward_block)(const S*, const S*, const S*, const S*, S, int64_t, int64_t, int64_t,
                         int64_t, S, S*, S*, S*);
};
template <class S>
CflFns<S> cfl_fns_avx2();  // contour_flow_avx2.cpp

namespace GK_CPU_ISA {

// dst[0..W) = sigmoid(src[0..W)) and dst[W] = 0 (the zero padding right of the image). The
// exponential is Sleef's 2-ULP variant (exp_u20; the 1-ULP one for double): a third cheaper, and
// the loss's float32 tolerance is far above it.
template <class S>
inline void sigmoid_row(const S* src, int64_t W, S* dst) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const V one(S(1));
  for (int64_t j = 0; j < W; j += VS) {
    const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
    (one / (one + (V(S(0)) - V::loadu(src + j, n)).exp_u20())).store(dst + j, n);
  }
  dst[W] = S(0);
}

// Forward over rows [r0, r1) of one plane: x logits, f0/f1 the plane's two flow channels.
// Writes the |c| map when `map` is non-null; returns the block sum.
template <class S>
double cfl_forward_block(const S* x, const S* f0p, const S* f1p, int64_t H, int64_t W, int64_t r0,
                         int64_t r1, S eps, S* map) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  std::vector<S> buf(static_cast<size_t>(2 * (W + 1)));
  S* cur = buf.data();
  S* nxt = cur + (W + 1);
  sigmoid_row(x + r0 * W, W, cur);
  double total = 0.0;
  for (int64_t i = r0; i < r1; ++i) {
    if (i + 1 < H) sigmoid_row(x + (i + 1) * W, W, nxt);
    else std::fill(nxt, nxt + W + 1, S(0));
    const S* f0 = f0p + i * W;
    const S* f1 = f1p + i * W;
    S* out = map ? map + i * W : nullptr;
    V acc(S(0));
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      const V u = V::loadu(cur + j, n);
      const V a0 = V::loadu(nxt + j, n) - u;
      const V a1 = V::loadu(cur + j + 1, n) - u;
      V v = cfl_value(a0, a1, V::loadu(f0 + j, n), V::loadu(f1 + j, n), eps);
      if (n < VS) v = V::set(V(S(0)), v, n);
      if (out) v.store(out + j, n);
      acc = acc + v;
    }
    S lanes[VS];
    acc.store(lanes);
    double row = 0.0;
    for (int64_t k = 0; k < VS; ++k) row += static_cast<double>(lanes[k]);
    total += row;
    std::swap(cur, nxt);
  }
  return total;
}

// Backward over rows [r0, r1): gradients w.r.t. the logits and both flow channels.
// w is grad_map[i, j] or the scalar w_scalar. grad u = div^-(g_a) (the adjoint of grad+).
template <class S>
void cfl_backward_block(const S* x, const S* f0p, const S* f1p, const S* grad_map, S w_scalar,
                        int64_t H, int64_t W, int64_t r0, int64_t r1, S eps, S* gx, S* gf0,
                        S* gf1) {
  using V = Vec<S>;
  constexpr int64_t VS = V::size();
  const int64_t LD = W + 1;
  std::vector<S> buf(static_cast<size_t>(5 * LD), S(0));
  S* cur = buf.data();        // sigmoid of row i (+ zero pad)
  S* nxt = cur + LD;          // sigmoid of row i + 1
  S* ga0_prev = nxt + LD;     // g_a0 of row i - 1 (zero above the image)
  S* ga0 = ga0_prev + LD;     // g_a0 of row i
  S* ga1 = ga0 + LD;          // [0] = 0 (column -1), g_a1 of row i at [1 + j]

  // partials of row i into ga0 / ga1 (+ flow gradients when the row is ours)
  auto partial_row = [&](int64_t i, bool own) {
    if (i + 1 < H) sigmoid_row(x + (i + 1) * W, W, nxt);
    else std::fill(nxt, nxt + LD, S(0));
    const S* f0 = f0p + i * W;
    const S* f1 = f1p + i * W;
    const S* wr = grad_map ? grad_map + i * W : nullptr;
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      const V u = V::loadu(cur + j, n);
      const V a0 = V::loadu(nxt + j, n) - u;
      const V a1 = V::loadu(cur + j + 1, n) - u;
      const V w = wr ? V::loadu(wr + j, n) : V(w_scalar);
      const CflGrad<V> g = cfl_grad(a0, a1, V::loadu(f0 + j, n), V::loadu(f1 + j, n), eps, w);
      g.a0.store(ga0 + j, n);
      g.a1.store(ga1 + 1 + j, n);
      if (own) {
        g.f0.store(gf0 + i * W + j, n);
        g.f1.store(gf1 + i * W + j, n);
      }
    }
  };

  if (r0 >= 1) {  // row r0 - 1 contributes g_a0 to row r0
    sigmoid_row(x + (r0 - 1) * W, W, cur);
    partial_row(r0 - 1, false);
    std::copy(ga0, ga0 + W, ga0_prev);
    std::swap(cur, nxt);  // nxt holds sigmoid(row r0)
  } else {
    sigmoid_row(x + r0 * W, W, cur);
  }
  for (int64_t i = r0; i < r1; ++i) {
    partial_row(i, true);
    S* g = gx + i * W;
    for (int64_t j = 0; j < W; j += VS) {
      const int n = static_cast<int>(std::min<int64_t>(VS, W - j));
      const V gu = V::loadu(ga0_prev + j, n) - V::loadu(ga0 + j, n) + V::loadu(ga1 + j, n) -
                   V::loadu(ga1 + 1 + j, n);
      const V u = V::loadu(cur + j, n);
      (gu * u * (V(S(1)) - u)).store(g + j, n);
    }
    std::swap(ga0_prev, ga0);
    std::swap(cur, nxt);
  }
}

}  // namespace GK_CPU_ISA
}  // namespace cpu
}  // namespace geokernels
