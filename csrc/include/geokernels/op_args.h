// Host-side argument parsing and checks shared by the CPU and CUDA op wrappers. The Python
// layer (geokernels/ops) validates first with friendlier messages; these checks keep direct
// torch.ops.geokernels.* calls from ever reaching a kernel with a bad tensor.
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "geokernels/common.h"

namespace geokernels {

inline Reduction parse_reduction(c10::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  if (r == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction must be 'mean', 'sum' or 'none', got '", std::string(r), "'");
  return Reduction::Mean;
}

// true for relu, false for softplus
inline bool parse_qc_activation(c10::string_view a) {
  if (a == "softplus") return false;
  if (a == "relu") return true;
  TORCH_CHECK_VALUE(false, "activation must be 'softplus' or 'relu', got '", std::string(a), "'");
  return false;
}

// qc2's scalar parameters (SPEC 1.2), bounded as the Python layer bounds them: beta = 0 gave an
// inf loss, a NaN margin a NaN one (qc2 loss and CGPM, CPU and CUDA).
inline void check_qc2_params(double margin, double beta, double eps, double grad_threshold) {
  TORCH_CHECK_VALUE(std::isfinite(margin), "margin must be finite, got ", margin);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, "beta must be finite and > 0, got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(grad_threshold) && grad_threshold >= 0,
                    "grad_threshold must be finite and >= 0, got ", grad_threshold);
}

inline void check_image4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must have shape (B, C, H, W), got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() > 0, name, " must not be empty, got shape ", t.sizes());
}

// Upstream gradient of a loss: a scalar for "mean"/"sum", the loss map's shape for "none".
inline void check_loss_grad(const at::Tensor& grad, const at::Tensor& u, Reduction red) {
  if (red == Reduction::None) {
    TORCH_CHECK_VALUE(grad.sizes() == u.sizes(), "grad must have the shape of u ", u.sizes(),
                      " for reduction='none', got ", grad.sizes());
  } else {
    TORCH_CHECK_VALUE(grad.numel() == 1, "grad must be a scalar for a reduced loss, got ",
                      grad.sizes());
  }
  TORCH_CHECK_VALUE(grad.device() == u.device(), "grad and u must be on the same device");
}

}  // namespace geokernels
