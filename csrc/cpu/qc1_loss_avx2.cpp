// AVX2+FMA build of the qc1_loss kernels (see isa.h for why this file exists).
#include "isa.h"

#if GK_AVX2_COMPILED
#include "avx2_begin.h"
#include "qc1_kernel.h"

namespace geokernels {
namespace cpu {

template <>
Qc1Fns<float> qc1_fns_avx2<float>() {
  return {&avx2::qc1_forward_block<float>, &avx2::qc1_backward_block<float>};
}
template <>
Qc1Fns<double> qc1_fns_avx2<double>() {
  return {&avx2::qc1_forward_block<double>, &avx2::qc1_backward_block<double>};
}

}  // namespace cpu
}  // namespace geokernels
#endif  // GK_AVX2_COMPILED
