// Host-side argument checks of the D-Convexity ops beyond qc2 (SPEC.md 1.3-1.5), shared by the
// CPU and CUDA wrappers. The Python layer validates first with friendlier messages; these keep
// direct torch.ops.geokernels.* calls from reaching a kernel with bad arguments.
#pragma once

#include <utility>

#include "geokernels/op_args.h"

namespace geokernels {

// Largest qc1 window the kernels accept (bounds the CUDA kernels' shared-memory halo).
constexpr int kQc1MaxWindow = 63;

inline void check_qc1_window(int64_t window) {
  TORCH_CHECK_VALUE(window >= 1 && window % 2 == 1, "window must be a positive odd integer, got ",
                    window);
  TORCH_CHECK_VALUE(window <= kQc1MaxWindow, "window must be <= ", kQc1MaxWindow, ", got ", window);
}

// Everything a fused CGPM run needs besides the tensors (SPEC 1.5).
struct CgpmConfig {
  int64_t first_step, steps;
  double lr, beta1, beta2, adam_eps, weight;
  int64_t order;  // 2 or 1
  double margin, beta, eps, grad_threshold;
  bool relu;
  int64_t window;
  bool return_history;
};

inline void check_cgpm_tensors(const at::Tensor& o, const at::Tensor& m, const at::Tensor& v,
                               const at::Tensor& u0) {
  check_image4d(o, "o");
  for (const auto& pair : {std::make_pair(&m, "m"), std::make_pair(&v, "v"), std::make_pair(&u0, "u0")}) {
    TORCH_CHECK_VALUE(pair.first->sizes() == o.sizes(), pair.second, " must have the shape of o ",
                      o.sizes(), ", got ", pair.first->sizes());
    TORCH_CHECK_TYPE(pair.first->scalar_type() == o.scalar_type(), pair.second,
                     " must have the dtype of o (", o.scalar_type(), "), got ",
                     pair.first->scalar_type());
    TORCH_CHECK_VALUE(pair.first->device() == o.device(), pair.second, " must be on the device of o");
  }
}

inline CgpmConfig make_cgpm_config(int64_t first_step, int64_t steps, double lr, double beta1,
                                   double beta2, double adam_eps, double weight, int64_t order,
                                   double margin, double beta, double eps, double grad_threshold,
                                   c10::string_view activation, int64_t window,
                                   bool return_history) {
  TORCH_CHECK_VALUE(first_step >= 0, "first_step must be >= 0, got ", first_step);
  TORCH_CHECK_VALUE(steps >= 0, "steps must be >= 0, got ", steps);
  TORCH_CHECK_VALUE(order == 1 || order == 2, "order must be 1 or 2, got ", order);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(adam_eps > 0, "adam_eps must be > 0, got ", adam_eps);
  check_qc2_params(margin, beta, eps, grad_threshold);
  const bool relu = parse_qc_activation(activation);
  if (order == 1) check_qc1_window(window);
  return {first_step, steps, lr, beta1, beta2, adam_eps, weight, order, margin, beta, eps,
          grad_threshold, relu, window, return_history};
}

}  // namespace geokernels
