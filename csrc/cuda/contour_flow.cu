// CUDA ops of the contour-flow shape loss (SPEC.md 2.3): one launch each way.
//
// Forward: one thread per pixel; sigmoid at the pixel and its bottom/right neighbours, |c| with
// the shared math (contour_flow_math.h), and the reduction finishes in the same launch
// (reduce.cuh). Backward: sigmoid of a (TH+2) x (TW+2) window is staged in shared memory, the
// per-pixel partials of the tile plus its top row / left column halo are computed once, then
// grad u = div^-(g_a) gathers them (the adjoint of grad+).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "geokernels/contour_flow_args.h"
#include "geokernels/contour_flow_math.h"
#include "geokernels/op_args.h"
#include "reduce.cuh"

namespace geokernels {
namespace cuda {
namespace {

constexpr int TW = 32, TH = 8;  // output tile; blockDim = (TW, TH)
constexpr unsigned kMaxGridZ = 65535;

template <class scalar_t, class opmath_t>
__device__ __forceinline__ opmath_t sig_at(const scalar_t* x, int64_t i, int64_t j, int64_t H, int64_t W) {
  if (i < 0 || i >= H || j < 0 || j >= W) return opmath_t(0);
  return gk_sigmoid(static_cast<opmath_t>(x[i * W + j]));
}

template <class scalar_t, class opmath_t>
__global__ void cfl_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ f,
                                   int64_t planes, int64_t H, int64_t W, opmath_t eps,
                                   scalar_t* __restrict__ map, double* __restrict__ partials,
                                   unsigned int* ticket, scalar_t* __restrict__ out, double scale) {
  const int64_t i = static_cast<int64_t>(blockIdx.y) * TH + threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * TW + threadIdx.x;
  double acc = 0.0;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    if (i < H && j < W) {
      const int64_t hw = H * W;
      const scalar_t* xp = x + plane * hw;
      const opmath_t u = sig_at<scalar_t, opmath_t>(xp, i, j, H, W);
      const opmath_t a0 = sig_at<scalar_t, opmath_t>(xp, i + 1, j, H, W) - u;
      const opmath_t a1 = sig_at<scalar_t, opmath_t>(xp, i, j + 1, H, W) - u;
      const opmath_t f0 = static_cast<opmath_t>(f[2 * plane * hw + i * W + j]);
      const opmath_t f1 = static_cast<opmath_t>(f[(2 * plane + 1) * hw + i * W + j]);
      const opmath_t v = cfl_value(a0, a1, f0, f1, eps);
      if (map) map[plane * hw + i * W + j] = static_cast<scalar_t>(v);
      acc += static_cast<double>(v);
    }
  }
  if (partials) deterministic_grid_sum(acc, partials, ticket, out, scale);
}

template <class scalar_t, class opmath_t>
__global__ void cfl_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ f,
                                    const scalar_t* __restrict__ grad, bool grad_is_map,
                                    opmath_t grad_divisor, int64_t planes, int64_t H, int64_t W,
                                    opmath_t eps, scalar_t* __restrict__ gx, scalar_t* __restrict__ gf) {
  __shared__ opmath_t su[TH + 2][TW + 2];   // sigmoid, rows i0-1 .. i0+TH, cols j0-1 .. j0+TW
  __shared__ opmath_t s_ga0[TH + 1][TW];    // g_a0, rows i0-1 .. i0+TH-1
  __shared__ opmath_t s_ga1[TH][TW + 1];    // g_a1, cols j0-1 .. j0+TW-1
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * TW + tx;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * TH, j0 = static_cast<int64_t>(blockIdx.x) * TW;
  const opmath_t w_scalar = grad_is_map ? opmath_t(0) : static_cast<opmath_t>(grad[0]) / grad_divisor;
  const int64_t hw = H * W;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const scalar_t* xp = x + plane * hw;
    const scalar_t* f0p = f + 2 * plane * hw;
    const scalar_t* f1p = f0p + hw;
    __syncthreads();
    for (int k = tid; k < (TH + 2) * (TW + 2); k += TW * TH) {
      const int r = k / (TW + 2), c = k % (TW + 2);
      su[r][c] = sig_at<scalar_t, opmath_t>(xp, i0 - 1 + r, j0 - 1 + c, H, W);
    }
    __syncthreads();
    // partials at (i0-1+r, j0-1+c) for r, c in [0, TH] x [0, TW]; keep what the tile needs
    for (int k = tid; k < (TH + 1) * (TW + 1); k += TW * TH) {
      const int r = k / (TW + 1), c = k % (TW + 1);
      const int64_t gi = i0 - 1 + r, gj = j0 - 1 + c;
      CflGrad<opmath_t> g{opmath_t(0), opmath_t(0), opmath_t(0), opmath_t(0)};
      const bool inside = gi >= 0 && gi < H && gj >= 0 && gj < W;
      if (inside) {
        const opmath_t u = su[r][c];
        const opmath_t w = grad_is_map ? static_cast<opmath_t>(grad[plane * hw + gi * W + gj]) : w_scalar;
        g = cfl_grad(su[r + 1][c] - u, su[r][c + 1] - u, static_cast<opmath_t>(f0p[gi * W + gj]),
                     static_cast<opmath_t>(f1p[gi * W + gj]), eps, w);
        if (r >= 1 && c >= 1) {
          gf[2 * plane * hw + gi * W + gj] = static_cast<scalar_t>(g.f0);
          gf[(2 * plane + 1) * hw + gi * W + gj] = static_cast<scalar_t>(g.f1);
        }
      }
      if (c >= 1) s_ga0[r][c - 1] = g.a0;
      if (r >= 1) s_ga1[r - 1][c] = g.a1;
    }
    __syncthreads();
    const int64_t i = i0 + ty, j = j0 + tx;
    if (i < H && j < W) {
      const opmath_t gu = (s_ga0[ty][tx] - s_ga0[ty + 1][tx]) + (s_ga1[ty][tx] - s_ga1[ty][tx + 1]);
      const opmath_t u = su[ty + 1][tx + 1];
      gx[plane * hw + i * W + j] = static_cast<scalar_t>(gu * u * (opmath_t(1) - u));
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& f) {
  check_image4d(x, "logits");
  check_image4d(f, "flow");
  TORCH_CHECK_VALUE(x.is_cuda(), "logits must be a CUDA tensor");
  check_flow_pairs(x, f);
}

dim3 tile_grid(int64_t planes, int64_t H, int64_t W) {
  const int64_t gx = (W + TW - 1) / TW, gy = (H + TH - 1) / TH;
  TORCH_CHECK_VALUE(gx <= 2147483647LL && gy <= 65535LL, "image of size ", H, "x", W,
                    " is too large for the CUDA tiling (H <= 524280)");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
              static_cast<unsigned>(std::min<int64_t>(planes, kMaxGridZ)));
}

at::Tensor contour_flow_loss_forward_cuda(const at::Tensor& logits, const at::Tensor& flow,
                                          double eps, c10::string_view reduction) {
  check_inputs(logits, flow);
  const Reduction red = parse_reduction(reduction);
  check_cfl_eps(eps);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor f = flow.to(x.scalar_type()).contiguous();
  const int64_t H = x.size(2), W = x.size(3), planes = x.size(0) * x.size(1);
  const dim3 grid = tile_grid(planes, H, W), block(TW, TH);
  at::Tensor map = red == Reduction::None ? at::empty_like(x) : at::Tensor();
  at::Tensor out = red == Reduction::None ? at::Tensor() : at::empty({}, x.options());
  at::Tensor partials;
  unsigned int* ticket = nullptr;
  if (red != Reduction::None) {
    const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
    partials = reduction_partials(nblocks, x.options());
    ticket = reduction_ticket(partials, nblocks, c10::cuda::getCurrentCUDAStream());
  }
  const double scale = red == Reduction::Mean ? 1.0 / static_cast<double>(x.numel()) : 1.0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "contour_flow_loss_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    cfl_forward_kernel<scalar_t, opmath_t><<<grid, block, 0, stream>>>(
        x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), planes, H, W, static_cast<opmath_t>(eps),
        map.defined() ? map.data_ptr<scalar_t>() : nullptr,
        partials.defined() ? partials.data_ptr<double>() : nullptr, ticket,
        out.defined() ? out.data_ptr<scalar_t>() : nullptr, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return red == Reduction::None ? map : out;
}

std::tuple<at::Tensor, at::Tensor> contour_flow_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& flow, double eps,
    c10::string_view reduction) {
  check_inputs(logits, flow);
  const Reduction red = parse_reduction(reduction);
  check_cfl_eps(eps);
  check_loss_grad(grad, logits, red);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor f = flow.to(x.scalar_type()).contiguous();
  const at::Tensor g = grad.to(x.scalar_type()).contiguous();
  const int64_t H = x.size(2), W = x.size(3), planes = x.size(0) * x.size(1);
  const dim3 grid = tile_grid(planes, H, W), block(TW, TH);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gf = at::empty_like(f);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "contour_flow_loss_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t divisor = red == Reduction::Mean ? static_cast<opmath_t>(x.numel()) : opmath_t(1);
    cfl_backward_kernel<scalar_t, opmath_t><<<grid, block, 0, stream>>>(
        x.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), red == Reduction::None,
        divisor, planes, H, W, static_cast<opmath_t>(eps), gx.data_ptr<scalar_t>(), gf.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gf.to(flow.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CUDA, m) {
  m.impl("contour_flow_loss_forward", &contour_flow_loss_forward_cuda);
  m.impl("contour_flow_loss_backward", &contour_flow_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace geokernels
