// AVX2 build of the midpoint convexification tile kernel (see isa.h for why this file exists).
#include "isa.h"

#if GK_AVX2_COMPILED
#include "avx2_begin.h"
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
