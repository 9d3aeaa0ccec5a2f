// The templated math vocabulary of csrc/include/geokernels/common.h, for at::vec::Vectorized.
// Comparisons yield all-ones lane masks and gk_select blends lanes, so the same formula text
// runs scalar or SIMD. Included only by CPU translation units (never by nvcc).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "geokernels/common.h"

namespace geokernels {

template <class S>
using Vec = at::vec::Vectorized<S>;

template <class S>
inline Vec<S> gk_select(const Vec<S>& mask, const Vec<S>& a, const Vec<S>& b) {
  return Vec<S>::blendv(b, a, mask);
}
template <class S>
inline Vec<S> gk_sqrt(const Vec<S>& x) { return x.sqrt(); }
template <class S>
inline Vec<S> gk_exp(const Vec<S>& x) { return x.exp(); }
template <class S>
inline Vec<S> gk_log1p(const Vec<S>& x) { return x.log1p(); }
template <class S>
inline Vec<S> gk_max(const Vec<S>& a, const Vec<S>& b) { return at::vec::maximum(a, b); }
template <class S>
inline Vec<S> gk_min(const Vec<S>& a, const Vec<S>& b) { return at::vec::minimum(a, b); }
template <class S>
inline Vec<S> gk_gt(const Vec<S>& a, const Vec<S>& b) { return a > b; }
template <class S>
inline Vec<S> gk_and(const Vec<S>& a, const Vec<S>& b) { return a & b; }

}  // namespace geokernels
