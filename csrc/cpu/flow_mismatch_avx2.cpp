// AVX2+FMA build of the flow-mismatch kernels (see isa.h for why this file exists): 8-lane
// Philox and Box-Muller (bit-identical to the scalar and CUDA versions, see philox.h) and
// auto-vectorised 256-bit reduction loops.
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

#define GK_FM_AVX2 1
#define GK_CPU_ISA avx2
#include "flow_mismatch_kernel.h"

namespace geokernels {
namespace cpu {

template <>
FlowMismatchFns<float> flow_mismatch_fns_avx2<float>() {
  return avx2::fns<float>();
}
template <>
FlowMismatchFns<double> flow_mismatch_fns_avx2<double>() {
  return avx2::fns<double>();
}

}  // namespace cpu
}  // namespace geokernels
#endif  // GK_AVX2_COMPILED
