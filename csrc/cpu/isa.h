// Run-time choice between the baseline build of a CPU kernel and its AVX2+FMA build.
//
// Each SIMD kernel header (e.g. qc2_kernel.h) is compiled twice: once in its family's .cpp with
// the compiler's default flags, and once in <family>_avx2.cpp under `#pragma GCC target`. The
// wheel therefore runs on any x86-64 (or non-x86) CPU and still uses 256-bit SIMD where present.
#pragma once

#include <atomic>
#include <string>

// The AVX2 translation units exist only for GCC on x86-64 (clang lacks `#pragma GCC target`).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define GK_AVX2_COMPILED 1
#else
#define GK_AVX2_COMPILED 0
#endif

namespace geokernels {
namespace cpu {

enum class Isa : int { Auto = 0, Base = 1, Avx2 = 2 };

// Overridable from Python (geokernels._C._set_cpu_isa) so tests can exercise both builds.
std::atomic<int>& isa_override();

// True when the AVX2 build of the kernels should run on this call.
bool use_avx2();

// "avx2" or "base": what use_avx2() resolves to now.
std::string active_isa();

}  // namespace cpu
}  // namespace geokernels
