// AVX2+FMA build of the CFSS kernels (see isa.h for why this file exists).
#include "isa.h"

#if GK_AVX2_COMPILED
#include "avx2_begin.h"
#include "cfss_kernel.h"

namespace geokernels {
namespace cpu {

template <>
CfssFns<float> cfss_fns_avx2<float>() {
  return {&avx2::cfss_init_block<float>, &avx2::cfss_forward_block<float>, &avx2::cfss_backward_block<float>,
          &avx2::cfss_finish_block<float>};
}
template <>
CfssFns<double> cfss_fns_avx2<double>() {
  return {&avx2::cfss_init_block<double>, &avx2::cfss_forward_block<double>, &avx2::cfss_backward_block<double>,
          &avx2::cfss_finish_block<double>};
}

}  // namespace cpu
}  // namespace geokernels
#endif  // GK_AVX2_COMPILED
