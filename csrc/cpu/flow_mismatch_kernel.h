// CPU kernels of flow-mismatch scoring (SPEC.md 3), written once and compiled twice: in
// flow_mismatch.cpp for the baseline ISA and in flow_mismatch_avx2.cpp for AVX2+FMA (isa.h picks
// one at run time). GK_CPU_ISA names the namespace so the two copies never collide (ODR).
//
// Work is split into FIXED blocks (a path and an element range, or an image and a pixel range)
// that depend on the shapes only, and every output value is produced by exactly one block in a
// fixed order, so results are bit-identical run to run, for any thread count and any chunking
// of the batch. The noise eps_k is regenerated from (seed, image, k) inside every block
// (philox.h); nothing of size K*T is ever stored.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "geokernels/philox.h"

#if defined(GK_FM_AVX2)
#include <immintrin.h>
#endif

#ifndef GK_CPU_ISA
#error "define GK_CPU_ISA before including flow_mismatch_kernel.h"
#endif

namespace geokernels {
namespace cpu {

// Geometry and noise source shared by the kernels. `noise` (B, K, C, H, W) replaces the
// generator when given.
template <class S>
struct FmGeometry {
  int64_t C, HW, K;
  uint64_t seed;
  int64_t image0;  // global index of local image 0
  const S* noise;  // nullable
};

// The kernels of one ISA build, as a table the dispatching translation unit can hold.
template <class S>
struct FlowMismatchFns {
  void (*noise)(const FmGeometry<S>&, int64_t B, S* out);
  void (*paths)(const FmGeometry<S>&, const S* x, int64_t path_start, int64_t count, double t, S* out);
  void (*delta)(const FmGeometry<S>&, const S* v, const S* x, int64_t path_start, int64_t count, S* out);
  bool (*accumulate)(const FmGeometry<S>&, S* heat, const S* v, const S* x, int64_t B, double weight,
                     int64_t rank, bool mean);
  bool (*aggregate)(S* heat, const S* delta, int64_t B, int64_t K, int64_t HW, double weight,
                    int64_t rank, bool mean);
};
template <class S>
FlowMismatchFns<S> flow_mismatch_fns_avx2();  // defined in flow_mismatch_avx2.cpp

constexpr int64_t kFmElemBlock = 4096;  // elements per path block (path building, noise)
constexpr int64_t kFmPixBlock = 256;    // pixels per reduction block

namespace GK_CPU_ISA {

#if defined(GK_FM_AVX2)
// 8-lane AVX2 policy for gk_box_muller (philox.h): same formula, 8 counters at once.
struct Avx2Lanes {
  using F = __m256;
  using U = __m256i;
  using M = __m256i;
  static inline F cf(float v) { return _mm256_set1_ps(v); }
  static inline U cu(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static inline F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static inline F i2f(U a) { return _mm256_cvtepi32_ps(a); }
  static inline U f2bits(F a) { return _mm256_castps_si256(a); }
  static inline F bits2f(U a) { return _mm256_castsi256_ps(a); }
  static inline U shr(U a, int s) { return _mm256_srli_epi32(a, s); }
  static inline U band(U a, U b) { return _mm256_and_si256(a, b); }
  static inline U bor(U a, U b) { return _mm256_or_si256(a, b); }
  static inline U add(U a, U b) { return _mm256_add_epi32(a, b); }
  static inline U subu(U a, U b) { return _mm256_sub_epi32(a, b); }
  static inline M gt(U a, U b) { return _mm256_cmpgt_epi32(a, b); }  // operands < 2^31
  static inline M eq(U a, U b) { return _mm256_cmpeq_epi32(a, b); }
  static inline U selu(M m, U a, U b) { return _mm256_blendv_epi8(b, a, m); }
  static inline F self(M m, F a, F b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
};

inline void mulhilo8(__m256i m, __m256i a, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6 (64-bit)
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Normals of the 8 element groups g .. g+7 (32 values, element order); needs (g mod 2^32) + 8
// <= 2^32 so that the low counter word never carries.
inline void philox_normals32(uint64_t seed, uint32_t image, uint32_t path, uint64_t g, float* out) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(image));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(path));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, c0, &hi0, &lo0);
    mulhilo8(m1, c2, &hi1, &lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  __m256 n0, n1, n2, n3;
  gk_box_muller<Avx2Lanes>(c0, c1, &n0, &n1);
  gk_box_muller<Avx2Lanes>(c2, c3, &n2, &n3);
  // 4x8 transpose: out[4 i + j] = n_j[i]
  const __m256 t0 = _mm256_unpacklo_ps(n0, n1), t1 = _mm256_unpackhi_ps(n0, n1);
  const __m256 t2 = _mm256_unpacklo_ps(n2, n3), t3 = _mm256_unpackhi_ps(n2, n3);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}
#endif  // GK_FM_AVX2

// Normals of elements [e0, e0 + n) of eps(seed, image, path), flattened (C, H, W) order.
inline void fill_normals(uint64_t seed, uint32_t image, uint32_t path, int64_t e0, int64_t n,
                         float* out) {
  uint64_t g = static_cast<uint64_t>(e0) >> 2;
  int64_t i = 0;
  float tmp[4];
  if (const int lane = static_cast<int>(e0 & 3)) {  // partial first group
    gk_philox_normals4(seed, image, path, g, tmp);
    for (int l = lane; l < 4 && i < n; ++l) out[i++] = tmp[l];
    ++g;
  }
#if defined(GK_FM_AVX2)
  for (; n - i >= 32 && (g & 0xFFFFFFFFull) + 8 <= 0x100000000ull; i += 32, g += 8)
    philox_normals32(seed, image, path, g, out + i);
#endif
  for (; n - i >= 4; i += 4, ++g) gk_philox_normals4(seed, image, path, g, out + i);
  if (i < n) {
    gk_philox_normals4(seed, image, path, g, tmp);
    for (int l = 0; i < n; ++l) out[i++] = tmp[l];
  }
}

template <class S>
inline uint32_t image_of(const FmGeometry<S>& geo, int64_t b) {
  return static_cast<uint32_t>(geo.image0 + b);
}

// eps(b, k) as a whole (B, K, C, H, W) tensor.
template <class S>
void noise(const FmGeometry<S>& geo, int64_t B, S* out) {
  const int64_t CHW = geo.C * geo.HW;
  const int64_t eblocks = (CHW + kFmElemBlock - 1) / kFmElemBlock;
  at::parallel_for(0, B * geo.K * eblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(kFmElemBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk / eblocks, e0 = (blk % eblocks) * kFmElemBlock;
      const int64_t len = std::min(kFmElemBlock, CHW - e0);
      fill_normals(geo.seed, image_of(geo, n / geo.K), static_cast<uint32_t>(n % geo.K), e0, len,
                   buf.data());
      S* o = out + n * CHW + e0;
      for (int64_t i = 0; i < len; ++i) o[i] = static_cast<S>(buf[i]);
    }
  });
}

// x_t = (1 - t) eps_k + t x for paths n = path_start .. path_start + count - 1 (n = b K + k).
template <class S>
void paths(const FmGeometry<S>& geo, const S* x, int64_t path_start, int64_t count, double t,
           S* out) {
  const int64_t CHW = geo.C * geo.HW;
  const int64_t eblocks = (CHW + kFmElemBlock - 1) / kFmElemBlock;
  const S a = static_cast<S>(1.0 - t), tt = static_cast<S>(t);
  at::parallel_for(0, count * eblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(geo.noise ? 0 : kFmElemBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t local = blk / eblocks, e0 = (blk % eblocks) * kFmElemBlock;
      const int64_t n = path_start + local, b = n / geo.K, k = n % geo.K;
      const int64_t len = std::min(kFmElemBlock, CHW - e0);
      const S* xb = x + b * CHW + e0;
      S* o = out + local * CHW + e0;
      if (geo.noise) {
        const S* eps = geo.noise + n * CHW + e0;
        for (int64_t i = 0; i < len; ++i) o[i] = a * eps[i] + tt * xb[i];
      } else {
        fill_normals(geo.seed, image_of(geo, b), static_cast<uint32_t>(k), e0, len, buf.data());
        const float* eps = buf.data();
        for (int64_t i = 0; i < len; ++i) o[i] = a * static_cast<S>(eps[i]) + tt * xb[i];
      }
    }
  });
}

// d[i] = sum_c (v - (x - eps))^2 over pixels p0 .. p0 + np - 1 of path n (one image b, path k).
template <class S, class E>
inline void delta_channel(const S* v, const S* x, const E* eps, int64_t np, bool first, S* d) {
  if (first) {
    for (int64_t i = 0; i < np; ++i) {
      const S diff = v[i] - (x[i] - static_cast<S>(eps[i]));
      d[i] = diff * diff;
    }
  } else {
    for (int64_t i = 0; i < np; ++i) {
      const S diff = v[i] - (x[i] - static_cast<S>(eps[i]));
      d[i] += diff * diff;
    }
  }
}

template <class S>
inline void delta_pixels(const FmGeometry<S>& geo, const S* v_path, const S* x_img, int64_t n,
                         int64_t p0, int64_t np, float* nbuf, S* d) {
  const int64_t b = n / geo.K, k = n % geo.K;
  for (int64_t c = 0; c < geo.C; ++c) {
    const int64_t off = c * geo.HW + p0;
    if (geo.noise) {
      delta_channel(v_path + off, x_img + off, geo.noise + n * geo.C * geo.HW + off, np, c == 0, d);
    } else {
      fill_normals(geo.seed, image_of(geo, b), static_cast<uint32_t>(k), off, np, nbuf);
      delta_channel(v_path + off, x_img + off, nbuf, np, c == 0, d);
    }
  }
}

// Aggregate K mismatch rows (row k at d + k * ld) per pixel and add weight * result to h.
// rank r: the r-th smallest (ties broken by path index); mean: the average. A NaN among the K
// values makes the result NaN (never silently dropped). Returns true if any value is not finite.
template <class S>
inline bool aggregate_pixels(const S* d, int64_t ld, int64_t K, int64_t np, int64_t rank,
                             bool mean, S weight, S* h) {
  constexpr S inf = std::numeric_limits<S>::infinity();
  S res[kFmPixBlock];
  unsigned char nan_seen[kFmPixBlock];
  unsigned nonfinite = 0;
  for (int64_t k = 0; k < K; ++k) {
    const S* dk = d + k * ld;
    for (int64_t i = 0; i < np; ++i) nonfinite |= static_cast<unsigned>(!(dk[i] < inf));
  }
  if (mean) {
    for (int64_t i = 0; i < np; ++i) res[i] = d[i];
    for (int64_t k = 1; k < K; ++k) {
      const S* dk = d + k * ld;
      for (int64_t i = 0; i < np; ++i) res[i] += dk[i];
    }
    const S kk = static_cast<S>(K);
    for (int64_t i = 0; i < np; ++i) res[i] = res[i] / kk;
  } else if (rank == 1) {
    for (int64_t i = 0; i < np; ++i) res[i] = d[i];
    for (int64_t k = 1; k < K; ++k) {
      const S* dk = d + k * ld;
      for (int64_t i = 0; i < np; ++i) {
        const S a = dk[i], m = res[i];
        res[i] = (a < m || a != a) ? a : m;  // NaN-propagating minimum
      }
    }
  } else {
    int32_t cnt[kFmPixBlock];
    for (int64_t i = 0; i < np; ++i) {
      res[i] = S(0);
      nan_seen[i] = 0;
    }
    const int32_t target = static_cast<int32_t>(rank - 1);
    for (int64_t k = 0; k < K; ++k) {
      const S* dk = d + k * ld;
      for (int64_t i = 0; i < np; ++i) cnt[i] = 0;
      // rank of d_k = #{j: d_j < d_k} + #{j < k: d_j == d_k}
      for (int64_t j = 0; j < K; ++j) {
        if (j == k) continue;
        const S* dj = d + j * ld;
        if (j < k) {
          for (int64_t i = 0; i < np; ++i) cnt[i] += static_cast<int32_t>(dj[i] <= dk[i]);
        } else {
          for (int64_t i = 0; i < np; ++i) cnt[i] += static_cast<int32_t>(dj[i] < dk[i]);
        }
      }
      for (int64_t i = 0; i < np; ++i) {
        res[i] = cnt[i] == target ? dk[i] : res[i];
        nan_seen[i] |= static_cast<unsigned char>(dk[i] != dk[i]);
      }
    }
    constexpr S qnan = std::numeric_limits<S>::quiet_NaN();
    for (int64_t i = 0; i < np; ++i) res[i] = nan_seen[i] ? qnan : res[i];
  }
  for (int64_t i = 0; i < np; ++i) h[i] += weight * res[i];
  return nonfinite != 0;
}

// delta[local] = sum_c (v - (x - eps))^2 for paths path_start .. path_start + count - 1.
template <class S>
void delta(const FmGeometry<S>& geo, const S* v, const S* x, int64_t path_start, int64_t count,
           S* out) {
  const int64_t CHW = geo.C * geo.HW;
  const int64_t pblocks = (geo.HW + kFmPixBlock - 1) / kFmPixBlock;
  at::parallel_for(0, count * pblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> nbuf(kFmPixBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t local = blk / pblocks, p0 = (blk % pblocks) * kFmPixBlock;
      const int64_t np = std::min(kFmPixBlock, geo.HW - p0);
      const int64_t n = path_start + local;
      delta_pixels(geo, v + local * CHW, x + (n / geo.K) * CHW, n, p0, np, nbuf.data(),
                   out + local * geo.HW + p0);
    }
  });
}

// heat[b] += weight * agg_k delta(b, k): the fused reduction (v holds all K paths of B images).
template <class S>
bool accumulate(const FmGeometry<S>& geo, S* heat, const S* v, const S* x, int64_t B,
                double weight, int64_t rank, bool mean) {
  const int64_t CHW = geo.C * geo.HW, K = geo.K;
  const int64_t pblocks = (geo.HW + kFmPixBlock - 1) / kFmPixBlock;
  std::vector<unsigned char> bad(static_cast<size_t>(B * pblocks), 0);
  const S w = static_cast<S>(weight);
  at::parallel_for(0, B * pblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> nbuf(kFmPixBlock);
    std::vector<S> dbuf(static_cast<size_t>(K * kFmPixBlock));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t b = blk / pblocks, p0 = (blk % pblocks) * kFmPixBlock;
      const int64_t np = std::min(kFmPixBlock, geo.HW - p0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = b * K + k;
        delta_pixels(geo, v + n * CHW, x + b * CHW, n, p0, np, nbuf.data(),
                     dbuf.data() + k * kFmPixBlock);
      }
      bad[blk] = aggregate_pixels(dbuf.data(), kFmPixBlock, K, np, rank, mean, w,
                                  heat + b * geo.HW + p0);
    }
  });
  return std::any_of(bad.begin(), bad.end(), [](unsigned char f) { return f != 0; });
}

// heat[b] += weight * agg_k delta[b, k] for a (B, K, H*W) buffer filled by `delta`.
template <class S>
bool aggregate(S* heat, const S* delta, int64_t B, int64_t K, int64_t HW, double weight,
               int64_t rank, bool mean) {
  const int64_t pblocks = (HW + kFmPixBlock - 1) / kFmPixBlock;
  std::vector<unsigned char> bad(static_cast<size_t>(B * pblocks), 0);
  const S w = static_cast<S>(weight);
  at::parallel_for(0, B * pblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t b = blk / pblocks, p0 = (blk % pblocks) * kFmPixBlock;
      const int64_t np = std::min(kFmPixBlock, HW - p0);
      bad[blk] = aggregate_pixels(delta + b * K * HW + p0, HW, K, np, rank, mean, w,
                                  heat + b * HW + p0);
    }
  });
  return std::any_of(bad.begin(), bad.end(), [](unsigned char f) { return f != 0; });
}

template <class S>
FlowMismatchFns<S> fns() {
  return {&noise<S>, &paths<S>, &delta<S>, &accumulate<S>, &aggregate<S>};
}

}  // namespace GK_CPU_ISA
}  // namespace cpu
}  // namespace geokernels
