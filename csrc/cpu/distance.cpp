// CPU ops of the exact distance transform and the contour-flow field (SPEC.md 2.1-2.2).
// Kernels: distance_kernel.h; pointwise field math: distance_math.h (shared with CUDA).
//
// Work is split into blocks fixed by the shape alone (column blocks for the column pass, row
// blocks for the row pass and the field), so results never depend on the thread count; there is
// no reduction anywhere, and the integer algebra makes every value exact.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "distance_kernel.h"
#include "geokernels/op_args.h"

namespace geokernels {
namespace cpu {
namespace {

constexpr int64_t kColsPerBlock = 256;  // column pass: one block sweeps all rows of 256 columns
constexpr int64_t kRowsPerBlock = 16;   // row pass / field: 16 rows of one plane
constexpr int64_t kMinPixelsPerTask = 1 << 16;  // smaller inputs stay on the calling thread

// at::parallel_for grain (in blocks) so that a task holds at least kMinPixelsPerTask pixels:
// waking the pool costs more than a small image (and much more on a loaded machine).
int64_t grain_for(int64_t pixels_per_block) {
  return std::max<int64_t>(1, kMinPixelsPerTask / std::max<int64_t>(1, pixels_per_block));
}

NoBackground parse_no_background(c10::string_view v) {
  if (v == "inf") return NoBackground::Inf;
  if (v == "scipy") return NoBackground::Scipy;
  TORCH_CHECK_VALUE(false, "no_background must be 'inf' or 'scipy', got '", std::string(v), "'");
  return NoBackground::Inf;
}

void check_mask(const at::Tensor& mask) {
  TORCH_CHECK_VALUE(mask.dim() == 4, "mask must have shape (B, C, H, W), got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.numel() > 0, "mask must not be empty, got shape ", mask.sizes());
  TORCH_CHECK_TYPE(!at::isComplexType(mask.scalar_type()), "mask must be a real tensor, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.size(2) + mask.size(3) < (int64_t{1} << 30),
                    "mask is too large for int32 column distances: ", mask.sizes());
}

// Column pass of every plane into g (planes x H x W int32).
void column_pass(const at::Tensor& mask, bool invert, int32_t* g) {
  const int64_t H = mask.size(2), W = mask.size(3), planes = mask.size(0) * mask.size(1);
  const int64_t col_blocks = (W + kColsPerBlock - 1) / kColsPerBlock;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(),
                             "edt_column_pass", [&] {
    const scalar_t* mp = mask.data_ptr<scalar_t>();
    const int64_t grain = grain_for(kColsPerBlock * H);
    at::parallel_for(0, planes * col_blocks, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / col_blocks, c0 = (b % col_blocks) * kColsPerBlock;
        const int64_t c1 = std::min(c0 + kColsPerBlock, W);
        edt_column_block(mp + plane * H * W, H, W, c0, c1, invert, g + plane * H * W);
      }
    });
  });
}

// Row pass of every plane: out (planes x H x W of S) from g.
template <class S>
void row_pass(const int32_t* g, int64_t planes, int64_t H, int64_t W, NoBackground mode, S* out) {
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t grain = grain_for(kRowsPerBlock * W);
  at::parallel_for(0, planes * row_blocks, grain, [&](int64_t b0, int64_t b1) {
    EdtRowScratch scratch(W);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
      const int64_t r1 = std::min(r0 + kRowsPerBlock, H);
      const int32_t* gp = g + plane * H * W;
      S* op = out + plane * H * W;
      const bool has_target = edt_plane_has_target(gp, H, W);
      for (int64_t i = r0; i < r1; ++i) {
        if (has_target) edt_row(gp + i * W, W, scratch, op + i * W);
        else edt_fill_no_background(W, i, mode, op + i * W);
      }
    }
  });
}

at::Tensor distance_transform_cpu(const at::Tensor& mask_in, bool invert, bool float64,
                                  c10::string_view no_background) {
  check_mask(mask_in);
  TORCH_CHECK_VALUE(mask_in.device().is_cpu(), "mask must be a CPU tensor");
  const NoBackground mode = parse_no_background(no_background);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t H = mask.size(2), W = mask.size(3), planes = mask.size(0) * mask.size(1);
  at::Tensor g = at::empty(mask.sizes(), mask.options().dtype(at::kInt));
  column_pass(mask, invert, g.data_ptr<int32_t>());
  at::Tensor out = at::empty(mask.sizes(), mask.options().dtype(float64 ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "edt_row_pass", [&] {
    row_pass<scalar_t>(g.data_ptr<int32_t>(), planes, H, W, mode, out.data_ptr<scalar_t>());
  });
  return out;
}

// SPEC 2.2 from the two distance maps; out holds planes x 2 maps (F0, F1 of each plane).
template <class S, class T>
void field_pass(const T* mask, const S* d_in, const S* d_out, const int32_t* g_in,
                const int32_t* g_out, int64_t planes, int64_t H, int64_t W, bool central, S* out) {
  const int64_t row_blocks = (H + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t grain = grain_for(kRowsPerBlock * W);
  at::parallel_for(0, planes * row_blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t plane = b / row_blocks, r0 = (b % row_blocks) * kRowsPerBlock;
      const int64_t r1 = std::min(r0 + kRowsPerBlock, H);
      const int64_t off = plane * H * W;
      S* f0 = out + 2 * off;
      S* f1 = f0 + H * W;
      // no contour in a constant plane (no background or no foreground): the field is zero
      const bool has_contour = edt_plane_has_target(g_in + off, H, W) &&
                               edt_plane_has_target(g_out + off, H, W);
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t j = 0; j < W; ++j) {
          const int64_t p = i * W + j;
          S g0 = 0, g1 = 0;  // "valid" border: G = 0 on every border pixel
          if (has_contour && i >= 1 && i <= H - 2 && j >= 1 && j <= W - 2) {
            if (mask[off + p] != static_cast<T>(0)) {
              const S* d = d_in + off;
              g0 = contour_flow_stencil(d[p + W], d[p], d[p - W], central);
              g1 = contour_flow_stencil(d[p + 1], d[p], d[p - 1], central);
            } else {
              const S* d = d_out + off;
              g0 = contour_flow_stencil(-d[p + W], -d[p], -d[p - W], central);
              g1 = contour_flow_stencil(-d[p + 1], -d[p], -d[p - 1], central);
            }
          }
          const FlowPair<S> fl = contour_flow_from_gradient(g0, g1);
          f0[p] = fl.f0;
          f1[p] = fl.f1;
        }
      }
    }
  });
}

at::Tensor contour_flow_field_cpu(const at::Tensor& mask_in, bool central, bool float64) {
  check_mask(mask_in);
  TORCH_CHECK_VALUE(mask_in.device().is_cpu(), "mask must be a CPU tensor");
  const at::Tensor mask = mask_in.contiguous();
  const int64_t B = mask.size(0), C = mask.size(1), H = mask.size(2), W = mask.size(3);
  const int64_t planes = B * C;
  const auto int_opts = mask.options().dtype(at::kInt);
  at::Tensor g_in = at::empty(mask.sizes(), int_opts), g_out = at::empty(mask.sizes(), int_opts);
  column_pass(mask, /*invert=*/false, g_in.data_ptr<int32_t>());
  column_pass(mask, /*invert=*/true, g_out.data_ptr<int32_t>());
  const auto real_opts = mask.options().dtype(float64 ? at::kDouble : at::kFloat);
  at::Tensor d_in = at::empty(mask.sizes(), real_opts), d_out = at::empty(mask.sizes(), real_opts);
  at::Tensor out = at::empty({B, 2 * C, H, W}, real_opts);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "contour_flow_field_cpu", [&] {
    using S = scalar_t;
    // the field of a constant plane is zero, so its distance fill value is never read
    row_pass<S>(g_in.data_ptr<int32_t>(), planes, H, W, NoBackground::Inf, d_in.data_ptr<S>());
    row_pass<S>(g_out.data_ptr<int32_t>(), planes, H, W, NoBackground::Inf, d_out.data_ptr<S>());
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(),
                               "contour_flow_field_cpu_mask", [&] {
      field_pass<S, scalar_t>(mask.data_ptr<scalar_t>(), d_in.data_ptr<S>(), d_out.data_ptr<S>(),
                              g_in.data_ptr<int32_t>(), g_out.data_ptr<int32_t>(), planes, H, W,
                              central, out.data_ptr<S>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CPU, m) {
  m.impl("distance_transform", &distance_transform_cpu);
  m.impl("contour_flow_field", &contour_flow_field_cpu);
}

}  // namespace cpu
}  // namespace geokernels
