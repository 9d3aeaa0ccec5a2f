// CUDA ops of the exact distance transform and the contour-flow field (SPEC.md 2.1-2.2).
//
// Same separable algebra as the CPU kernels (csrc/cpu/distance_kernel.h), shared formulas in
// csrc/cpu/distance_math.h, all in integers until the final square root:
//   column kernel: one thread per (plane, column) sweeps down and up: g = |i - k| to the nearest
//     target pixel in the column (coalesced: neighbouring threads read neighbouring columns);
//     it also ORs a per-plane "has a target pixel" flag (integer atomics: order-independent).
//   row kernel: one thread per pixel minimises (j - k)^2 + g[i,k]^2 scanning k outward from j
//     and stopping once (k - j)^2 alone reaches the best value: O(distance) work per pixel,
//     exact (no candidate beyond the stop can be smaller).
//   field kernel: one thread per pixel applies the SPEC 2.2 stencil to the two distance maps.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "cpu/distance_math.h"
#include "geokernels/op_args.h"

namespace geokernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops beyond this

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

// One thread per (plane, column): g[., j] and the plane's flag bit.
template <class T>
__global__ void edt_column_kernel(const T* __restrict__ mask, int64_t planes, int64_t H, int64_t W,
                                  bool invert, int32_t* __restrict__ g, int* __restrict__ has_target) {
  const int32_t inf = edt_infinity(H, W);
  const int64_t n = planes * W;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = idx / W, j = idx % W;
    const T* m = mask + plane * H * W + j;
    int32_t* gc = g + plane * H * W + j;
    int32_t run = inf;
    bool any = false;
    for (int64_t i = 0; i < H; ++i) {
      const bool target = edt_is_target(m[i * W], invert);
      run = target ? 0 : run + 1;
      any = any || target;
      gc[i * W] = run;
    }
    for (int64_t i = H - 2; i >= 0; --i) {
      const int32_t below = gc[(i + 1) * W] + 1;
      const int32_t here = gc[i * W];
      if (below < here) gc[i * W] = below;
    }
    if (any) atomicOr(has_target + plane, 1);
  }
}

// min_k (j - k)^2 + g[k]^2 over one row, scanning outward from j.
__device__ __forceinline__ int64_t edt_row_min(const int32_t* __restrict__ gr, int64_t W, int64_t j) {
  const int64_t gj = gr[j];
  int64_t best = gj * gj;
  for (int64_t r = 1; r * r < best && (j - r >= 0 || j + r < W); ++r) {
    if (j - r >= 0) {
      const int64_t v = gr[j - r];
      const int64_t c = r * r + v * v;
      best = c < best ? c : best;
    }
    if (j + r < W) {
      const int64_t v = gr[j + r];
      const int64_t c = r * r + v * v;
      best = c < best ? c : best;
    }
  }
  return best;
}

template <class S>
__global__ void edt_row_kernel(const int32_t* __restrict__ g, const int* __restrict__ has_target,
                               int64_t planes, int64_t H, int64_t W, NoBackground mode,
                               S* __restrict__ out) {
  const int64_t n = planes * H * W;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = idx / (H * W), rem = idx % (H * W), i = rem / W, j = rem % W;
    if (has_target[plane]) out[idx] = edt_from_squared<S>(edt_row_min(g + plane * H * W + i * W, W, j));
    else out[idx] = edt_no_background_value<S>(mode, i, j);
  }
}

template <class S, class T>
__global__ void contour_flow_field_kernel(const T* __restrict__ mask, const S* __restrict__ d_in,
                                          const S* __restrict__ d_out,
                                          const int* __restrict__ has_bg,
                                          const int* __restrict__ has_fg, int64_t planes,
                                          int64_t H, int64_t W, bool central, S* __restrict__ out) {
  const int64_t n = planes * H * W;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = idx / (H * W), p = idx % (H * W), i = p / W, j = p % W;
    S g0 = 0, g1 = 0;  // "valid" border and constant planes: G = 0
    if (has_bg[plane] && has_fg[plane] && i >= 1 && i <= H - 2 && j >= 1 && j <= W - 2) {
      if (mask[idx] != static_cast<T>(0)) {
        const S* d = d_in + plane * H * W;
        g0 = contour_flow_stencil(d[p + W], d[p], d[p - W], central);
        g1 = contour_flow_stencil(d[p + 1], d[p], d[p - 1], central);
      } else {
        const S* d = d_out + plane * H * W;
        g0 = contour_flow_stencil(-d[p + W], -d[p], -d[p - W], central);
        g1 = contour_flow_stencil(-d[p + 1], -d[p], -d[p - 1], central);
      }
    }
    const FlowPair<S> fl = contour_flow_from_gradient(g0, g1);
    S* f0 = out + 2 * plane * H * W;
    f0[p] = fl.f0;
    f0[H * W + p] = fl.f1;
  }
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
  TORCH_CHECK_VALUE(mask.is_cuda(), "mask must be a CUDA tensor");
  TORCH_CHECK_VALUE(mask.size(2) + mask.size(3) < (int64_t{1} << 30),
                    "mask is too large for int32 column distances: ", mask.sizes());
}

// Column pass into g and the per-plane flags (zeroed here).
void column_pass(const at::Tensor& mask, bool invert, at::Tensor& g, at::Tensor& flags,
                 cudaStream_t stream) {
  const int64_t H = mask.size(2), W = mask.size(3), planes = mask.size(0) * mask.size(1);
  flags.zero_();
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(),
                             "edt_column_cuda", [&] {
    edt_column_kernel<scalar_t><<<blocks_for(planes * W), kThreads, 0, stream>>>(
        mask.data_ptr<scalar_t>(), planes, H, W, invert, g.data_ptr<int32_t>(),
        flags.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <class S>
void row_pass(const at::Tensor& g, const at::Tensor& flags, int64_t planes, int64_t H, int64_t W,
              NoBackground mode, S* out, cudaStream_t stream) {
  edt_row_kernel<S><<<blocks_for(planes * H * W), kThreads, 0, stream>>>(
      g.data_ptr<int32_t>(), flags.data_ptr<int>(), planes, H, W, mode, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor distance_transform_cuda(const at::Tensor& mask_in, bool invert, bool float64,
                                   c10::string_view no_background) {
  check_mask(mask_in);
  const NoBackground mode = parse_no_background(no_background);
  c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = mask_in.contiguous();
  const int64_t H = mask.size(2), W = mask.size(3), planes = mask.size(0) * mask.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor g = at::empty(mask.sizes(), mask.options().dtype(at::kInt));
  at::Tensor flags = at::empty({planes}, mask.options().dtype(at::kInt));
  column_pass(mask, invert, g, flags, stream);
  at::Tensor out = at::empty(mask.sizes(), mask.options().dtype(float64 ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "edt_row_cuda", [&] {
    row_pass<scalar_t>(g, flags, planes, H, W, mode, out.data_ptr<scalar_t>(), stream);
  });
  return out;
}

at::Tensor contour_flow_field_cuda(const at::Tensor& mask_in, bool central, bool float64) {
  check_mask(mask_in);
  c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = mask_in.contiguous();
  const int64_t B = mask.size(0), C = mask.size(1), H = mask.size(2), W = mask.size(3);
  const int64_t planes = B * C;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto int_opts = mask.options().dtype(at::kInt);
  at::Tensor g_in = at::empty(mask.sizes(), int_opts), g_out = at::empty(mask.sizes(), int_opts);
  at::Tensor has_bg = at::empty({planes}, int_opts), has_fg = at::empty({planes}, int_opts);
  column_pass(mask, /*invert=*/false, g_in, has_bg, stream);
  column_pass(mask, /*invert=*/true, g_out, has_fg, stream);
  const auto real_opts = mask.options().dtype(float64 ? at::kDouble : at::kFloat);
  at::Tensor d_in = at::empty(mask.sizes(), real_opts), d_out = at::empty(mask.sizes(), real_opts);
  at::Tensor out = at::empty({B, 2 * C, H, W}, real_opts);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "contour_flow_field_cuda", [&] {
    using S = scalar_t;
    row_pass<S>(g_in, has_bg, planes, H, W, NoBackground::Inf, d_in.data_ptr<S>(), stream);
    row_pass<S>(g_out, has_fg, planes, H, W, NoBackground::Inf, d_out.data_ptr<S>(), stream);
    AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mask.scalar_type(),
                               "contour_flow_field_cuda_mask", [&] {
      contour_flow_field_kernel<S, scalar_t><<<blocks_for(planes * H * W), kThreads, 0, stream>>>(
          mask.data_ptr<scalar_t>(), d_in.data_ptr<S>(), d_out.data_ptr<S>(),
          has_bg.data_ptr<int>(), has_fg.data_ptr<int>(), planes, H, W, central,
          out.data_ptr<S>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CUDA, m) {
  m.impl("distance_transform", &distance_transform_cuda);
  m.impl("contour_flow_field", &contour_flow_field_cuda);
}

}  // namespace cuda
}  // namespace geokernels
