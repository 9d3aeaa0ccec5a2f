// CUDA ops of the first-order quasi-concavity loss (SPEC.md 1.3): one launch each way.
// Tile functions and the shared-memory layout: qc1_tile.cuh; math: qc1_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "geokernels/dconvex_args.h"
#include "qc1_tile.cuh"
#include "reduce.cuh"

namespace geokernels {
namespace cuda {
namespace {

constexpr unsigned kMaxGridZ = 65535;

template <class opmath_t>
struct Qc1SmemPtrs {
  opmath_t *ny, *nx, *u, *w;
};

template <class opmath_t>
__device__ Qc1SmemPtrs<opmath_t> qc1_smem_ptrs(const Qc1Smem& L) {
  extern __shared__ __align__(16) unsigned char gk_qc1_smem[];
  opmath_t* base = reinterpret_cast<opmath_t*>(gk_qc1_smem);
  Qc1SmemPtrs<opmath_t> p;
  p.ny = base;
  p.nx = base + L.K;
  p.u = base + 2 * L.K;
  p.w = L.weight_map ? p.u + static_cast<int64_t>(L.SR) * L.SC : nullptr;
  return p;
}

template <class scalar_t, class opmath_t>
__global__ void qc1_forward_kernel(const scalar_t* __restrict__ u, int64_t planes, int64_t H,
                                   int64_t W, Qc1Smem L, scalar_t* __restrict__ map,
                                   double* __restrict__ partials, unsigned int* ticket,
                                   scalar_t* __restrict__ out, double scale) {
  const Qc1SmemPtrs<opmath_t> s = qc1_smem_ptrs<opmath_t>(L);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kQc1TileW;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kQc1TileH;
  const int64_t i = i0 + threadIdx.y, j = j0 + threadIdx.x;
  double acc = 0.0;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t off = plane * H * W;
    qc1_stage<scalar_t, opmath_t>(u + off, nullptr, H, W, i0, j0, L, s.ny, s.nx, s.u, nullptr);
    const opmath_t v = qc1_tile_value(H, W, i0, j0, L, s.ny, s.nx, s.u);
    if (i < H && j < W) {
      if (map) map[off + i * W + j] = static_cast<scalar_t>(v);
      acc += static_cast<double>(v);
    }
  }
  if (partials) deterministic_grid_sum(acc, partials, ticket, out, scale);
}

template <class scalar_t, class opmath_t>
__global__ void qc1_backward_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ grad,
                                    opmath_t grad_divisor, int64_t planes, int64_t H, int64_t W,
                                    Qc1Smem L, scalar_t* __restrict__ grad_u) {
  const Qc1SmemPtrs<opmath_t> s = qc1_smem_ptrs<opmath_t>(L);
  // the block's positions start at (i0, j0); it outputs their (TW-1) x (TH-1) interior
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * (kQc1TileW - 1);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * (kQc1TileH - 1);
  const int64_t i = i0 + threadIdx.y, j = j0 + threadIdx.x;
  const opmath_t w_scalar = L.weight_map ? opmath_t(0) : static_cast<opmath_t>(grad[0]) / grad_divisor;
  const bool writes = threadIdx.x < kQc1TileW - 1 && threadIdx.y < kQc1TileH - 1 && i < H && j < W;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t off = plane * H * W;
    qc1_stage<scalar_t, opmath_t>(u + off, L.weight_map ? grad + off : nullptr, H, W, i0, j0, L,
                                  s.ny, s.nx, s.u, s.w);
    const Qc1Position<opmath_t> q = qc1_tile_position(H, W, i0, j0, L, s.ny, s.nx, s.u, s.w, w_scalar);
    const opmath_t g = qc1_tile_adjoint(q, i0, j0);
    if (writes) grad_u[off + i * W + j] = static_cast<scalar_t>(g);
  }
}

void check_cuda_input(const at::Tensor& u) {
  check_image4d(u, "u");
  TORCH_CHECK_VALUE(u.is_cuda(), "u must be a CUDA tensor");
}

dim3 qc1_grid(int64_t planes, int64_t H, int64_t W, int tile_h, int tile_w) {
  const int64_t gx = (W + tile_w - 1) / tile_w, gy = (H + tile_h - 1) / tile_h;
  TORCH_CHECK_VALUE(gx <= 2147483647LL && gy <= 65535LL, "image of size ", H, "x", W,
                    " is too large for the CUDA tiling");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
              static_cast<unsigned>(std::min<int64_t>(planes, kMaxGridZ)));
}

at::Tensor qc1_loss_forward_cuda(const at::Tensor& u_in, int64_t window, c10::string_view reduction) {
  check_cuda_input(u_in);
  check_qc1_window(window);
  const Reduction red = parse_reduction(reduction);
  c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous();
  const int64_t H = u.size(2), W = u.size(3), planes = u.size(0) * u.size(1);
  const dim3 grid = qc1_grid(planes, H, W, kQc1TileH, kQc1TileW), block(kQc1TileW, kQc1TileH);
  at::Tensor map = red == Reduction::None ? at::empty_like(u) : at::Tensor();
  at::Tensor out = red == Reduction::None ? at::Tensor() : at::empty({}, u.options());
  at::Tensor partials;
  unsigned int* ticket = nullptr;
  if (red != Reduction::None) {
    const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
    partials = reduction_partials(nblocks, u.options());
    ticket = reduction_ticket(partials, nblocks, c10::cuda::getCurrentCUDAStream());
  }
  const double scale = red == Reduction::Mean
      ? 1.0 / (static_cast<double>(u.numel()) * static_cast<double>(window * window)) : 1.0;
  const Qc1Smem L = qc1_smem_layout(static_cast<int>(window), false);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "qc1_loss_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const size_t smem = static_cast<size_t>(L.count()) * sizeof(opmath_t);
    auto kernel = qc1_forward_kernel<scalar_t, opmath_t>;
    qc1_prepare_smem(kernel, smem);
    kernel<<<grid, block, smem, stream>>>(
        u.data_ptr<scalar_t>(), planes, H, W, L, map.defined() ? map.data_ptr<scalar_t>() : nullptr,
        partials.defined() ? partials.data_ptr<double>() : nullptr, ticket,
        out.defined() ? out.data_ptr<scalar_t>() : nullptr, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return red == Reduction::None ? map : out;
}

at::Tensor qc1_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& u_in, int64_t window,
                                  c10::string_view reduction) {
  check_cuda_input(u_in);
  check_qc1_window(window);
  const Reduction red = parse_reduction(reduction);
  check_loss_grad(grad, u_in, red);
  c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous();
  const at::Tensor g = grad.to(u.scalar_type()).contiguous();
  const int64_t H = u.size(2), W = u.size(3), planes = u.size(0) * u.size(1);
  const dim3 grid = qc1_grid(planes, H, W, kQc1TileH - 1, kQc1TileW - 1), block(kQc1TileW, kQc1TileH);
  at::Tensor grad_u = at::empty_like(u);
  const Qc1Smem L = qc1_smem_layout(static_cast<int>(window), red == Reduction::None);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "qc1_loss_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t divisor = red == Reduction::Mean
        ? static_cast<opmath_t>(static_cast<double>(u.numel()) * static_cast<double>(window * window))
        : opmath_t(1);
    const size_t smem = static_cast<size_t>(L.count()) * sizeof(opmath_t);
    auto kernel = qc1_backward_kernel<scalar_t, opmath_t>;
    qc1_prepare_smem(kernel, smem);
    kernel<<<grid, block, smem, stream>>>(u.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), divisor,
                                          planes, H, W, L, grad_u.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CUDA, m) {
  m.impl("qc1_loss_forward", &qc1_loss_forward_cuda);
  m.impl("qc1_loss_backward", &qc1_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace geokernels
