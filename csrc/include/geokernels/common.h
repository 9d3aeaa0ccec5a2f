// Shared, backend-neutral helpers. Included by C++ CPU sources and by .cu sources, so nothing
// here may depend on ATen vector types or on CUDA-only headers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

namespace geokernels {

// Scalar versions of the small vocabulary the templated pointwise math uses. The CPU vector
// backend (csrc/cpu/vec_shim.h) provides the same names for at::vec::Vectorized, so one
// formula serves scalar C++, CUDA and SIMD code (single source of truth for the SPEC math).
GK_HD float gk_select(bool m, float a, float b) { return m ? a : b; }
GK_HD double gk_select(bool m, double a, double b) { return m ? a : b; }
GK_HD float gk_sqrt(float x) { return ::sqrtf(x); }
GK_HD double gk_sqrt(double x) { return ::sqrt(x); }
GK_HD float gk_exp(float x) { return ::expf(x); }
GK_HD double gk_exp(double x) { return ::exp(x); }
GK_HD float gk_log1p(float x) { return ::log1pf(x); }
GK_HD double gk_log1p(double x) { return ::log1p(x); }
GK_HD float gk_max(float a, float b) { return a > b ? a : b; }
GK_HD double gk_max(double a, double b) { return a > b ? a : b; }
GK_HD float gk_min(float a, float b) { return a < b ? a : b; }
GK_HD double gk_min(double a, double b) { return a < b ? a : b; }
GK_HD bool gk_gt(float a, float b) { return a > b; }
GK_HD bool gk_gt(double a, double b) { return a > b; }
GK_HD bool gk_and(bool a, bool b) { return a && b; }

GK_HD int64_t gk_clamp_low(int64_t i) { return i < 0 ? 0 : i; }

// Reduction codes shared by every loss op (the schema passes strings; kernels see ints).
enum class Reduction : int { None = 0, Mean = 1, Sum = 2 };

}  // namespace geokernels
