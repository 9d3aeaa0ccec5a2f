// Counter-based noise of the flow-mismatch kernels (SPEC.md 3): Philox 4x32-10 and a float32
// Box-Muller transform built from +, *, fma, sqrt and integer operations only, so that the CPU
// (scalar and SIMD builds), CUDA and Triton kernels produce bit-identical normals.
//
// ---- The stream (reproduce it anywhere with this text) -------------------------------------
// Noise eps[b, k] of image b (global index: image_index_offset + local index) and path k is a
// (C, H, W) float32 tensor; flatten it row-major and let e be the element index.
//   group g = e / 4, lane = e % 4
//   key     = (seed mod 2^32, seed >> 32)                       (seed: unsigned 64-bit)
//   counter = (g mod 2^32, g >> 32, image mod 2^32, k mod 2^32)
//   (x0, x1, x2, x3) = Philox4x32-10(counter, key)              (Random123 / curand round
//        function and key schedule: 10 rounds, multipliers 0xD2511F53, 0xCD9E8D57, Weyl
//        increments 0x9E3779B9, 0xBB67AE85; the key is bumped after every round)
//   lanes 0, 1 = Box-Muller(x0, x1) = (R cos theta, R sin theta), lanes 2, 3 = Box-Muller(x2, x3)
// Box-Muller(xr, xa), exactly:
//   u     = (2 * (xr >> 9) + 1) / 2^24          in (0, 1), never 0 or 1
//   R     = sqrt(-2 ln u)                       (ln: Cephes logf polynomial, below)
//   a     = xa >> 8                             (24 bits)
//   theta = 2 pi a / 2^24 = (pi/2) (q + f),  q = a >> 22 (quadrant), f = (a mod 2^22) / 2^22
// A float64 implementation of these formulas (geokernels/reference/flow_mismatch.py) agrees with
// the kernels to float32 rounding; the kernels themselves agree bit for bit with each other.
//
// ---- Why the arithmetic looks the way it does -----------------------------------------------
// C++ compilers (GCC even in ISO mode) and nvcc contract `a * b + c` into an fma when the target
// has one, so the same source line can round differently per build. Every multiply-add below is
// therefore an explicit fma, and no plain product ever feeds an addition: the result is then
// fixed by IEEE-754 alone (fma, *, -, sqrt and int->float conversion are correctly rounded on
// every backend). The transform is written once, as a template over a "lanes" policy (scalar
// here; 8-wide AVX2 in csrc/cpu/flow_mismatch_kernel.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "geokernels/common.h"

namespace geokernels {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t x[4];
};

GK_HD void gk_mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *lo = a * b;
  *hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *lo = static_cast<uint32_t>(p);
  *hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32-10 of one counter (Salmon et al., SC'11; identical to Random123 and curand).
GK_HD Philox4 gk_philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
#pragma unroll
  for (int r = 0; r < kPhiloxRounds; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    gk_mulhilo32(kPhiloxM0, c0, &hi0, &lo0);
    gk_mulhilo32(kPhiloxM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// ---- Box-Muller constants (float32) ----------------------------------------------------------
// ln(1 + f) = f + f^2 (-1/2 + f P(f)) on f in [sqrt(1/2) - 1, sqrt(2) - 1] (Cephes logf).
#define GK_BM_LOG_COEFFS                                                                        \
  {7.0376836292E-2f, -1.1514610310E-1f, 1.1676998740E-1f, -1.2420140846E-1f, 1.4249322787E-1f, \
   -1.6668057665E-1f, 2.0000714765E-1f, -2.4999993993E-1f, 3.3333331174E-1f}
constexpr float kBmLn2Hi = 0.693359375f;       // ln 2 = hi + lo, hi exact in few bits
constexpr float kBmLn2Lo = -2.12194440e-4f;
constexpr uint32_t kBmSqrt2Bits = 0x3FB504F3u;  // 1.41421354f
// sin((pi/2) g), cos((pi/2) g) on g in [0, 1/2]: Taylor coefficients of (pi/2)^n / n!, float32.
constexpr float kBmS1 = 1.5707963705062866f, kBmS3 = -0.6459640860557556f,
                kBmS5 = 0.07969262450933456f, kBmS7 = -0.004681753925979137f,
                kBmS9 = 0.00016044118092395365f;
constexpr float kBmC2 = -1.2337005138397217f, kBmC4 = 0.25366950035095215f,
                kBmC6 = -0.020863480865955353f, kBmC8 = 0.0009192602592520416f,
                kBmC10 = -2.520204179745633e-05f;

// Scalar lanes policy (CPU scalar code and CUDA threads).
struct ScalarLanes {
  using F = float;
  using U = uint32_t;  // also holds signed int32 values as two's complement
  using M = bool;
  static GK_HD F cf(float v) { return v; }
  static GK_HD U cu(uint32_t v) { return v; }
  static GK_HD F fma(F a, F b, F c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
  }
  static GK_HD F mul(F a, F b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
  static GK_HD F sub(F a, F b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
  }
  static GK_HD F neg(F a) { return -a; }
  static GK_HD F sqrt(F a) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(a);
#else
    return std::sqrt(a);
#endif
  }
  static GK_HD F i2f(U a) { return static_cast<float>(static_cast<int32_t>(a)); }
  static GK_HD U f2bits(F a) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(a);
#else
    U u;
    std::memcpy(&u, &a, sizeof(u));
    return u;
#endif
  }
  static GK_HD F bits2f(U a) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(a);
#else
    F f;
    std::memcpy(&f, &a, sizeof(f));
    return f;
#endif
  }
  static GK_HD U shr(U a, int s) { return a >> s; }
  static GK_HD U band(U a, U b) { return a & b; }
  static GK_HD U bor(U a, U b) { return a | b; }
  static GK_HD U add(U a, U b) { return a + b; }
  static GK_HD U subu(U a, U b) { return a - b; }
  // a > b for values below 2^31 (callers never compare larger ones)
  static GK_HD M gt(U a, U b) { return a > b; }
  static GK_HD M eq(U a, U b) { return a == b; }
  static GK_HD U selu(M m, U a, U b) { return m ? a : b; }
  static GK_HD F self(M m, F a, F b) { return m ? a : b; }
};

// Two standard normals (R cos theta, R sin theta) from two Philox words (see the stream above).
template <class L>
GK_HD void gk_box_muller(typename L::U xr, typename L::U xa, typename L::F* n_cos,
                         typename L::F* n_sin) {
  using F = typename L::F;
  using U = typename L::U;
  // ---- R = sqrt(-2 ln u), u = w / 2^24, w = 2 (xr >> 9) + 1 ----
  const U w = L::bor(L::shr(xr, 8), L::cu(1u));  // odd, < 2^24: exact as float
  const U wbits = L::f2bits(L::i2f(w));
  // w = 2^E * m, m in [1, 2); fold m into [sqrt(1/2), sqrt(2)] like Cephes; ln u = ln m + (E-24) ln 2
  U mbits = L::bor(L::band(wbits, L::cu(0x007FFFFFu)), L::cu(0x3F800000u));
  U e = L::subu(L::shr(wbits, 23), L::cu(127u + 24u));
  const auto big = L::gt(mbits, L::cu(kBmSqrt2Bits));
  mbits = L::selu(big, L::subu(mbits, L::cu(0x00800000u)), mbits);
  e = L::selu(big, L::add(e, L::cu(1u)), e);
  const F f = L::sub(L::bits2f(mbits), L::cf(1.0f));  // exact (Sterbenz)
  const float P[9] = GK_BM_LOG_COEFFS;
  F p = L::cf(P[0]);
#pragma unroll
  for (int i = 1; i < 9; ++i) p = L::fma(p, f, L::cf(P[i]));
  const F s = L::fma(p, f, L::cf(-0.5f));
  const F ln_m = L::fma(L::mul(f, f), s, f);
  const F ef = L::i2f(e);
  F ln_u = L::fma(ef, L::cf(kBmLn2Lo), ln_m);
  ln_u = L::fma(ef, L::cf(kBmLn2Hi), ln_u);
  const F radius = L::sqrt(L::mul(ln_u, L::cf(-2.0f)));
  // ---- theta = (pi/2)(q + f): quadrant q, f in [0, 1) reflected to g in [0, 1/2] ----
  const U a = L::shr(xa, 8);
  const U q = L::shr(a, 22);
  const U fi = L::band(a, L::cu(0x003FFFFFu));
  const auto refl = L::gt(fi, L::cu(0x00200000u));
  const U gi = L::selu(refl, L::subu(L::cu(0x00400000u), fi), fi);
  const F g = L::mul(L::i2f(gi), L::cf(2.384185791015625e-07f));  // * 2^-22, exact
  const F g2 = L::mul(g, g);
  F ps = L::fma(g2, L::cf(kBmS9), L::cf(kBmS7));
  ps = L::fma(g2, ps, L::cf(kBmS5));
  ps = L::fma(g2, ps, L::cf(kBmS3));
  ps = L::fma(g2, ps, L::cf(kBmS1));
  const F sin_g = L::mul(g, ps);
  F pc = L::fma(g2, L::cf(kBmC10), L::cf(kBmC8));
  pc = L::fma(g2, pc, L::cf(kBmC6));
  pc = L::fma(g2, pc, L::cf(kBmC4));
  pc = L::fma(g2, pc, L::cf(kBmC2));
  const F cos_g = L::fma(g2, pc, L::cf(1.0f));
  // sin/cos of (pi/2) f: swapped when f was reflected (f = 1 - g)
  const F s0 = L::self(refl, cos_g, sin_g);
  const F c0 = L::self(refl, sin_g, cos_g);
  // rotate by q quarter turns: odd q swaps (cos, sin) -> (-sin, cos); q >= 2 negates both
  const auto odd = L::eq(L::band(q, L::cu(1u)), L::cu(1u));
  const auto half = L::eq(L::band(q, L::cu(2u)), L::cu(2u));
  const F c1 = L::self(odd, L::neg(s0), c0);
  const F s1 = L::self(odd, c0, s0);
  const F cos_t = L::self(half, L::neg(c1), c1);
  const F sin_t = L::self(half, L::neg(s1), s1);
  *n_cos = L::mul(radius, cos_t);
  *n_sin = L::mul(radius, sin_t);
}

// The four float32 normals of element group g of eps(seed, image, path).
GK_HD void gk_philox_normals4(uint64_t seed, uint32_t image, uint32_t path, uint64_t group,
                              float out[4]) {
  const Philox4 r = gk_philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                                     image, path, static_cast<uint32_t>(seed),
                                     static_cast<uint32_t>(seed >> 32));
  gk_box_muller<ScalarLanes>(r.x[0], r.x[1], &out[0], &out[1]);
  gk_box_muller<ScalarLanes>(r.x[2], r.x[3], &out[2], &out[3]);
}

}  // namespace geokernels
