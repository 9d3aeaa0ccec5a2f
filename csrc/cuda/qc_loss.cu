// CUDA ops of the quasi-concavity loss family (SPEC.md 1.2): one launch each way.
//
// Forward: a 32x8 tile of u plus a 2-pixel top/left halo is staged in shared memory; each thread
// evaluates one pixel with the same templated math as the CPU kernels (qc2_math.h); reductions
// finish in the same launch (reduce.cuh). Backward: qc2_tile_grad (qc2_tile.cuh, shared with the
// fused CGPM step) computes the tile's partials plus a 2-pixel bottom/right halo once into
// shared memory, then gathers them with the adjoint stencils into grad u.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "geokernels/op_args.h"
#include "geokernels/qc2_math.h"
#include "qc2_tile.cuh"
#include "reduce.cuh"

namespace geokernels {
namespace cuda {
namespace {

constexpr int TW = kQc2TileW, TH = kQc2TileH;  // output tile; blockDim = (TW, TH)
constexpr unsigned kMaxGridZ = 65535;

__device__ __forceinline__ int64_t clampi(int64_t v, int64_t hi) {
  return v < 0 ? 0 : (v > hi ? hi : v);
}

template <class scalar_t, class opmath_t>
__global__ void qc2_forward_kernel(const scalar_t* __restrict__ u, int64_t planes, int64_t H,
                                   int64_t W, Qc2Params<opmath_t> p, scalar_t* __restrict__ map,
                                   double* __restrict__ partials, unsigned int* ticket,
                                   scalar_t* __restrict__ out, double scale) {
  __shared__ opmath_t tile[TH + 2][TW + 2];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * TW, i0 = static_cast<int64_t>(blockIdx.y) * TH;
  const int64_t i = i0 + ty, j = j0 + tx;
  double acc = 0.0;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const scalar_t* up = u + plane * H * W;
    __syncthreads();
    for (int k = ty * TW + tx; k < (TH + 2) * (TW + 2); k += TW * TH) {
      const int r = k / (TW + 2), c = k % (TW + 2);
      const int64_t gi = clampi(i0 - 2 + r, H - 1), gj = clampi(j0 - 2 + c, W - 1);
      tile[r][c] = static_cast<opmath_t>(up[gi * W + gj]);
    }
    __syncthreads();
    if (i < H && j < W) {
      // replicate padding == SPEC's prepend differences (see qc2_math.h); tile row/col offset 2
      const int r = ty + 2, c = tx + 2;
      const int rt = i >= 1 ? r - 1 : r, rtt = i >= 2 ? r - 2 : rt;
      const int cl = j >= 1 ? c - 1 : c, cll = j >= 2 ? c - 2 : cl;
      const opmath_t v = qc2_value(
          qc2_stencil(tile[r][c], tile[r][cl], tile[r][cll], tile[rt][c], tile[rtt][c], tile[rt][cl]), p);
      if (map) map[plane * H * W + i * W + j] = static_cast<scalar_t>(v);
      acc += static_cast<double>(v);
    }
  }
  if (partials) deterministic_grid_sum(acc, partials, ticket, out, scale);
}

template <class scalar_t, class opmath_t>
__global__ void qc2_backward_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ grad,
                                    bool grad_is_map, opmath_t grad_divisor, int64_t planes,
                                    int64_t H, int64_t W, Qc2Params<opmath_t> p,
                                    scalar_t* __restrict__ grad_u) {
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * TW, i0 = static_cast<int64_t>(blockIdx.y) * TH;
  const opmath_t w_scalar = grad_is_map ? opmath_t(0) : static_cast<opmath_t>(grad[0]) / grad_divisor;
  const int64_t i = i0 + threadIdx.y, j = j0 + threadIdx.x;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t off = plane * H * W;
    const opmath_t g = qc2_tile_grad<scalar_t, opmath_t>(u + off, grad_is_map ? grad + off : nullptr,
                                                         w_scalar, H, W, i0, j0, p);
    if (i < H && j < W) grad_u[off + i * W + j] = static_cast<scalar_t>(g);
  }
}

void check_cuda_input(const at::Tensor& u) {
  check_image4d(u, "u");
  TORCH_CHECK_VALUE(u.is_cuda(), "u must be a CUDA tensor");
}

dim3 tile_grid(int64_t planes, int64_t H, int64_t W) {
  const int64_t gx = (W + TW - 1) / TW, gy = (H + TH - 1) / TH;
  TORCH_CHECK_VALUE(gx <= 2147483647LL && gy <= 65535LL, "image of size ", H, "x", W,
                    " is too large for the CUDA tiling (H <= 524280)");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
              static_cast<unsigned>(std::min<int64_t>(planes, kMaxGridZ)));
}

at::Tensor qc2_loss_forward_cuda(const at::Tensor& u_in, double margin, double beta, double eps,
                                 double grad_threshold, c10::string_view activation,
                                 c10::string_view reduction) {
  check_cuda_input(u_in);
  const Reduction red = parse_reduction(reduction);
  const bool relu = parse_qc_activation(activation);
  check_qc2_params(margin, beta, eps, grad_threshold);
  c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous();
  const int64_t H = u.size(2), W = u.size(3), planes = u.size(0) * u.size(1);
  const dim3 grid = tile_grid(planes, H, W), block(TW, TH);
  at::Tensor map = red == Reduction::None ? at::empty_like(u) : at::Tensor();
  at::Tensor out = red == Reduction::None ? at::Tensor() : at::empty({}, u.options());
  at::Tensor partials;
  unsigned int* ticket = nullptr;
  if (red != Reduction::None) {
    const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
    partials = reduction_partials(nblocks, u.options());
    ticket = reduction_ticket(partials, nblocks, c10::cuda::getCurrentCUDAStream());
  }
  const double scale = red == Reduction::Mean ? 1.0 / static_cast<double>(u.numel()) : 1.0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "qc2_loss_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Qc2Params<opmath_t> p{static_cast<opmath_t>(margin), static_cast<opmath_t>(beta),
                          static_cast<opmath_t>(eps), static_cast<opmath_t>(grad_threshold), relu};
    qc2_forward_kernel<scalar_t, opmath_t><<<grid, block, 0, stream>>>(
        u.data_ptr<scalar_t>(), planes, H, W, p, map.defined() ? map.data_ptr<scalar_t>() : nullptr,
        partials.defined() ? partials.data_ptr<double>() : nullptr, ticket,
        out.defined() ? out.data_ptr<scalar_t>() : nullptr, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return red == Reduction::None ? map : out;
}

at::Tensor qc2_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& u_in, double margin,
                                  double beta, double eps, double grad_threshold,
                                  c10::string_view activation, c10::string_view reduction) {
  check_cuda_input(u_in);
  const Reduction red = parse_reduction(reduction);
  const bool relu = parse_qc_activation(activation);
  check_qc2_params(margin, beta, eps, grad_threshold);
  check_loss_grad(grad, u_in, red);
  c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous();
  const at::Tensor g = grad.to(u.scalar_type()).contiguous();
  const int64_t H = u.size(2), W = u.size(3), planes = u.size(0) * u.size(1);
  const dim3 grid = tile_grid(planes, H, W), block(TW, TH);
  at::Tensor grad_u = at::empty_like(u);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "qc2_loss_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Qc2Params<opmath_t> p{static_cast<opmath_t>(margin), static_cast<opmath_t>(beta),
                          static_cast<opmath_t>(eps), static_cast<opmath_t>(grad_threshold), relu};
    const opmath_t divisor = red == Reduction::Mean ? static_cast<opmath_t>(u.numel()) : opmath_t(1);
    qc2_backward_kernel<scalar_t, opmath_t><<<grid, block, 0, stream>>>(
        u.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), red == Reduction::None, divisor, planes, H, W,
        p, grad_u.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CUDA, m) {
  m.impl("qc2_loss_forward", &qc2_loss_forward_cuda);
  m.impl("qc2_loss_backward", &qc2_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace geokernels
