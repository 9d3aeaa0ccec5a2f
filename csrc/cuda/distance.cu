// CUDA ops of the exact distance transform and the contour-flow field (SPEC.md 2.1-2.2).
//
// Same separable algebra as the CPU kernels (csrc/cpu/distance_kernel.h), shared formulas in
// csrc/cpu/distance_math.h, all in integers until the final square root:
//   column kernel: one thread per (plane, column) sweeps down and up: g = |i - k| to the nearest
//     target pixel in the column (coalesced: neighbouring threads read neighbouring columns);
//     it also ORs a per-plane "has a target pixel" flag (integer atomics: order-independent).
//   row kernel: one block per row. The block sums the scan's cost bound sum_j min(g[j], W);
//     cheap rows (all rows of typical masks) are minimised pixel-parallel by the outward scan,
//     the others by the O(W) lower envelope, built by one thread in shared memory and then read
//     by all threads (binary search of each pixel's segment). Rows too wide for shared memory
//     always take the scan (exact, only slower).
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
#include "smem.cuh"

namespace geokernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops beyond this
// A row takes the envelope only when the scan's cost bound exceeds this many steps per pixel:
// the scan runs pixel-parallel while one thread builds an envelope, so the GPU break-even is far
// above the CPU's (kEdtScanStepsPerPixel). Measured on an H200: pure scan 0.19 ms for
// 8x1x512x512 shape masks but 94 ms for a 4096^2 image with one background pixel; always taking
// the envelope above 4 steps per pixel: 0.60 ms and 10 ms.
constexpr int64_t kScanStepsPerPixelCuda = 256;

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
#pragma unroll 8
    for (int64_t i = 0; i < H; ++i) {
      const bool target = edt_is_target(m[i * W], invert);
      run = target ? 0 : run + 1;
      any = any || target;
      gc[i * W] = run;
    }
    // run holds g[H-1]; carry the up-sweep value in a register (no dependent reloads)
#pragma unroll 8
    for (int64_t i = H - 2; i >= 0; --i) {
      const int32_t here = gc[i * W];
      run = run + 1 < here ? run + 1 : here;
      if (run != here) gc[i * W] = run;
    }
    if (any) atomicOr(has_target + plane, 1);
  }
}

// One block per row (grid-stride over rows); blockDim.x is a multiple of 32, at most kThreads.
// Dynamic shared memory: 2 * W int32 (the envelope) when use_envelope, else none.
template <class S>
__global__ void edt_row_kernel(const int32_t* __restrict__ g, const int* __restrict__ has_target,
                               int64_t planes, int64_t H, int64_t W, NoBackground mode,
                               bool use_envelope, S* __restrict__ out) {
  extern __shared__ int32_t envelope[];  // s[0..W), t[0..W)
  __shared__ long long warp_cost[kThreads / 32];
  __shared__ long long row_cost;
  __shared__ int envelope_size;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  for (int64_t row = blockIdx.x; row < planes * H; row += gridDim.x) {
    const int64_t plane = row / H, i = row % H;
    const int32_t* gr = g + row * W;
    S* orow = out + row * W;
    if (!has_target[plane]) {  // uniform over the block
      for (int64_t j = tid; j < W; j += nthreads) orow[j] = edt_no_background_value<S>(mode, i, j);
      continue;
    }
    bool scan = true;
    if (use_envelope) {
      long long c = 0;
      for (int64_t j = tid; j < W; j += nthreads) c += gr[j] < W ? gr[j] : W;
      for (int off = 16; off > 0; off /= 2) c += __shfl_down_sync(0xffffffffu, c, off);
      if ((tid & 31) == 0) warp_cost[tid / 32] = c;
      __syncthreads();
      if (tid == 0) {
        long long total = 0;  // fixed order; integers anyway
        for (int w = 0; w < nthreads / 32; ++w) total += warp_cost[w];
        row_cost = total;
      }
      __syncthreads();
      scan = row_cost <= kScanStepsPerPixelCuda * W;
    }
    if (scan) {
      for (int64_t j = tid; j < W; j += nthreads)
        orow[j] = gr[j] == 0 ? S(0) : edt_from_squared<S>(edt_row_min_scan(gr, W, j));
    } else {
      int32_t* s = envelope;
      int32_t* t = envelope + W;
      if (tid == 0) envelope_size = static_cast<int>(edt_envelope(gr, W, s, t));
      __syncthreads();
      const int n = envelope_size;
      for (int64_t j = tid; j < W; j += nthreads) {
        int lo = 0, hi = n - 1;  // the last segment q with t[q] <= j (t[0] = 0)
        while (lo < hi) {
          const int mid = (lo + hi + 1) / 2;
          if (t[mid] <= j) lo = mid;
          else hi = mid - 1;
        }
        orow[j] = edt_from_squared<S>(edt_parabola(gr, j, s[lo]));
      }
    }
    __syncthreads();  // shared state is rewritten by the next row
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
  // threads per row: W rounded up to a warp, at most kThreads
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (W + 31) / 32 * 32));
  const int64_t rows = planes * H;
  const int blocks = static_cast<int>(std::min<int64_t>(rows, kMaxBlocks));
  // the envelope lives in shared memory: 8 W bytes, up to what the device allows per block
  // beside the kernel's static shared memory (an estimate of that static part launched widths
  // 6135-6144 over the default 48 KiB without raising the limit: "invalid argument")
  const int64_t env_bytes = 2 * W * static_cast<int64_t>(sizeof(int32_t));
  // (W <= kScanStepsPerPixelCuda: the scan's cost bound can never exceed the threshold)
  const bool use_envelope = W > kScanStepsPerPixelCuda &&
                            static_cast<size_t>(env_bytes) <= max_dynamic_smem(edt_row_kernel<S>);
  const int shared = use_envelope ? static_cast<int>(env_bytes) : 0;
  if (use_envelope) {
    allow_dynamic_smem(edt_row_kernel<S>, static_cast<size_t>(shared), "distance_transform row pass",
                       "unreachable: wider rows take the scan path");
  }
  edt_row_kernel<S><<<blocks, threads, shared, stream>>>(
      g.data_ptr<int32_t>(), flags.data_ptr<int>(), planes, H, W, mode, use_envelope, out);
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
