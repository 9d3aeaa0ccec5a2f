// AVX2+FMA build of the fused CGPM step (see isa.h for why this file exists).
#include "isa.h"

#if GK_AVX2_COMPILED
#include "avx2_begin.h"
#include "cgpm_kernel.h"

namespace geokernels {
namespace cpu {

template <>
CgpmFns<float> cgpm_fns_avx2<float>() {
  return {&avx2::cgpm_step_block<float>};
}
template <>
CgpmFns<double> cgpm_fns_avx2<double>() {
  return {&avx2::cgpm_step_block<double>};
}

}  // namespace cpu
}  // namespace geokernels
#endif  // GK_AVX2_COMPILED
