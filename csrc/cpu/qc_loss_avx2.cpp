// AVX2+FMA build of the quasi-concavity loss kernels (see isa.h for why this file exists).
#include "isa.h"

#if GK_AVX2_COMPILED
#include "avx2_begin.h"
#include "qc2_kernel.h"

namespace geokernels {
namespace cpu {

template <>
Qc2Fns<float> qc2_fns_avx2<float>() {
  return {&avx2::qc2_forward_block<float>, &avx2::qc2_backward_block<float>};
}
template <>
Qc2Fns<double> qc2_fns_avx2<double>() {
  return {&avx2::qc2_forward_block<double>, &avx2::qc2_backward_block<double>};
}

}  // namespace cpu
}  // namespace geokernels
#endif  // GK_AVX2_COMPILED
