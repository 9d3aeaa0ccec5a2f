// Host-side checks shared by the CPU and CUDA wrappers of the contour-flow ops (SPEC 2.3-2.4).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "geokernels/op_args.h"

namespace geokernels {

// contour_flow_loss's eps clamps both norms (SPEC 2.3): eps = 0 with a zero flow was NaN.
inline void check_cfl_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps);
}

// flow (or T) must be (B, 2C, H, W) for logits (B, C, H, W), on the same device.
inline void check_flow_pairs(const at::Tensor& x, const at::Tensor& flow,
                             const char* xname = "logits", const char* fname = "flow") {
  TORCH_CHECK_VALUE(flow.dim() == 4 && flow.size(0) == x.size(0) && flow.size(1) == 2 * x.size(1) &&
                        flow.size(2) == x.size(2) && flow.size(3) == x.size(3),
                    fname, " must have shape (B, 2C, H, W) = (", x.size(0), ", ", 2 * x.size(1), ", ",
                    x.size(2), ", ", x.size(3), ") for ", xname, " of shape ", x.sizes(), ", got ",
                    flow.sizes());
  TORCH_CHECK_VALUE(flow.device() == x.device(), fname, " and ", xname,
                    " must be on the same device, got ", flow.device(), " and ", x.device());
}

}  // namespace geokernels
