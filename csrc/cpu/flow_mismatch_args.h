// Host-side argument checks of the flow-mismatch ops (SPEC.md 3), shared by the CPU and CUDA
// wrappers. The Python layer (geokernels/ops/flow_mismatch.py) validates first with friendlier
// messages; these keep direct torch.ops.geokernels.* calls from reaching a kernel with a bad
// tensor or an out-of-range path index.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include "geokernels/op_args.h"

namespace geokernels {

constexpr int64_t kFmMaxIndex = 4294967296LL;  // image and path indices are 32-bit counter words

struct FmShape {
  int64_t B, C, H, W, K;
  int64_t HW() const { return H * W; }
};

inline FmShape check_fm_x(const at::Tensor& x, int64_t num_paths, int64_t image_offset) {
  check_image4d(x, "x");
  TORCH_CHECK_VALUE(num_paths >= 1 && num_paths <= kFmMaxIndex,
                    "num_paths (K) must be in [1, 2^32], got ", num_paths);
  TORCH_CHECK_VALUE(image_offset >= 0 && image_offset + x.size(0) <= kFmMaxIndex,
                    "image_offset must be >= 0 with image_offset + B <= 2^32, got ", image_offset);
  return {x.size(0), x.size(1), x.size(2), x.size(3), num_paths};
}

inline void check_fm_same(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (",
                   x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on the device of x (", x.device(),
                    "), got ", t.device());
}

inline void check_fm_noise(const c10::optional<at::Tensor>& noise, const at::Tensor& x,
                           const FmShape& s) {
  if (!noise.has_value() || !noise->defined()) return;
  const at::Tensor& n = *noise;
  TORCH_CHECK_VALUE(n.dim() == 5 && n.size(0) == s.B && n.size(1) == s.K && n.size(2) == s.C &&
                        n.size(3) == s.H && n.size(4) == s.W,
                    "noise must have shape (B, K, C, H, W) = (", s.B, ", ", s.K, ", ", s.C, ", ",
                    s.H, ", ", s.W, "), got ", n.sizes());
  check_fm_same(n, x, "noise");
}

inline void check_fm_path_range(const FmShape& s, int64_t path_start, int64_t count) {
  TORCH_CHECK_VALUE(path_start >= 0 && count >= 0 && path_start + count <= s.B * s.K,
                    "paths [path_start, path_start + count) = [", path_start, ", ",
                    path_start + count, ") must lie in [0, B*K = ", s.B * s.K, ")");
}

inline void check_fm_velocity(const at::Tensor& v, const at::Tensor& x, const FmShape& s,
                              int64_t count) {
  TORCH_CHECK_VALUE(v.dim() == 4 && v.size(0) == count && v.size(1) == s.C && v.size(2) == s.H &&
                        v.size(3) == s.W,
                    "v must have shape (paths, C, H, W) = (", count, ", ", s.C, ", ", s.H, ", ",
                    s.W, "), got ", v.sizes());
  check_fm_same(v, x, "v");
}

// heat accumulates in the op-math type of the inputs (float32 for float16/bfloat16 on CUDA).
inline void check_fm_heat(const at::Tensor& heat, at::ScalarType input_type, const at::Device& dev,
                          int64_t B, int64_t H, int64_t W) {
  TORCH_CHECK_VALUE(heat.dim() == 3 && heat.size(0) == B && heat.size(1) == H && heat.size(2) == W,
                    "heat must have shape (B, H, W) = (", B, ", ", H, ", ", W, "), got ",
                    heat.sizes());
  const at::ScalarType want = at::toOpMathType(input_type);
  TORCH_CHECK_TYPE(heat.scalar_type() == want, "heat must have dtype ", want, ", got ",
                   heat.scalar_type());
  TORCH_CHECK_VALUE(heat.device() == dev, "heat must be on device ", dev, ", got ", heat.device());
}

inline void check_fm_rank(int64_t rank, bool mean, int64_t K) {
  TORCH_CHECK_VALUE(mean || (rank >= 1 && rank <= K), "rank must be in [1, K = ", K, "], got ",
                    rank);
}

}  // namespace geokernels
