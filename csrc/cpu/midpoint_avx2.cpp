// AVX2 build of the midpoint convexification tile kernel (see isa.h for why this file exists).
#include "isa.h"

#if GK_AVX2_COMPILED
#pragma GCC target("avx2,fma")
// The pragma enables the instructions; these macros make the ATen headers emit their 256-bit
// code paths, exactly as ATen's own AVX2 kernel builds do.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2 1

#define GK_CPU_ISA avx2
#include "midpoint_kernel.h"

namespace geokernels {
namespace cpu {

template <>
MidpointFns<float> midpoint_fns_avx2<float>() {
  return {&avx2::midpoint_tile<float>};
}
template <>
MidpointFns<double> midpoint_fns_avx2<double>() {
  return {&avx2::midpoint_tile<double>};
}

}  // namespace cpu
}  // namespace geokernels
#endif  // GK_AVX2_COMPILED
