// AVX2+FMA build of the contour-flow loss kernels (see isa.h for why this file exists).
#include "isa.h"

#if GK_AVX2_COMPILED
#include "avx2_begin.h"
#include "contour_flow_kernel.h"

namespace geokernels {
namespace cpu {

template <>
CflFns<float> cfl_fns_avx2<float>() {
  return {&avx2::cfl_forward_block<float>, &avx2::cfl_backward_block<float>};
}
template <>
CflFns<double> cfl_fns_avx2<double>() {
  return {&avx2::cfl_forward_block<double>, &avx2::cfl_backward_block<double>};
}

}  // namespace cpu
}  // namespace geokernels
#endif  // GK_AVX2_COMPILED
