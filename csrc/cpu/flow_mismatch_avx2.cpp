// AVX2+FMA build of the flow-mismatch kernels (see isa.h for why this file exists): 8-lane
// Philox and Box-Muller (bit-identical to the scalar and CUDA versions, see philox.h) and
// auto-vectorised 256-bit reduction loops.
#include "isa.h"

#if GK_AVX2_COMPILED
#include "avx2_begin.h"
#define GK_FM_AVX2 1
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
