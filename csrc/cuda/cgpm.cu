// CUDA op of the fused CGPM loop (SPEC.md 1.5): ONE kernel launch per Adam step, no host sync.
//
// u = sigmoid(o) lives in two buffers (ping-pong): a step reads neighbours from u_cur only and
// writes u_next, so tiles are independent. Per tile the shape-loss gradient comes from the same
// device functions as the loss backward kernels (qc2_tile.cuh / qc1_tile.cuh), then each thread
//   dL/du = weight * d(qc)/du - 2/N relu(u0 - u);  g = dL/du (1 - u) u
// and updates m, v, o in place (Adam of SPEC 1.5) and writes u_next = sigmoid(o).
// With return_history the step also reduces L at the start of the step into history[step]
// (deterministic single-launch grid sum, reduce.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "geokernels/dconvex_args.h"
#include "qc1_tile.cuh"
#include "qc2_tile.cuh"
#include "reduce.cuh"

namespace geokernels {
namespace cuda {
namespace {

constexpr unsigned kMaxGridZ = 65535;

template <class S>
struct CgpmStep {
  const S* u_cur;
  S* u_next;
  const S* u0;
  S* o;
  S* m;
  S* v;
  int64_t planes, H, W;
  S qc_weight, fid_weight;
  S beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2, lr, adam_eps;
  double loss_fid_scale, loss_qc_scale;
  double* partials;  // non-null: reduce the loss into *history
  unsigned int* ticket;
  double* history;
};

// The fused epilogue for pixel k; returns the pixel's fidelity term relu(u0 - u)^2.
template <class S>
__device__ __forceinline__ S cgpm_adam_pixel(const CgpmStep<S>& a, int64_t k, S grad_shape) {
  const S uu = a.u_cur[k];
  const S gap = gk_max(a.u0[k] - uu, S(0));
  const S grad_u = grad_shape - a.fid_weight * gap;
  const S g = grad_u * (S(1) - uu) * uu;
  const S m = a.beta1 * a.m[k] + a.one_minus_beta1 * g;
  const S v = a.beta2 * a.v[k] + a.one_minus_beta2 * g * g;
  const S m_hat = m / a.bias1;
  const S v_hat = v / a.bias2;
  const S o = a.o[k] - a.lr * m_hat / (gk_sqrt(v_hat) + a.adam_eps);
  a.m[k] = m;
  a.v[k] = v;
  a.o[k] = o;
  a.u_next[k] = qc1_sigmoid(o);
  return gap * gap;
}

template <class S, bool WITH_LOSS>
__global__ void cgpm_c2_step_kernel(CgpmStep<S> a, Qc2Params<S> p) {
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kQc2TileW;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kQc2TileH;
  const int64_t i = i0 + threadIdx.y, j = j0 + threadIdx.x, H = a.H, W = a.W;
  double loss = 0.0;
  for (int64_t plane = blockIdx.z; plane < a.planes; plane += gridDim.z) {
    const int64_t off = plane * H * W;
    const S* u = a.u_cur + off;
    const S g = qc2_tile_grad<S, S>(u, nullptr, a.qc_weight, H, W, i0, j0, p);
    if (i < H && j < W) {
      const S fid = cgpm_adam_pixel(a, off + i * W + j, g);
      if (WITH_LOSS) {
        // the stencil from global memory (cached): replicate padding == SPEC's prepend diffs
        const int64_t it = i >= 1 ? i - 1 : i, itt = i >= 2 ? i - 2 : it;
        const int64_t jl = j >= 1 ? j - 1 : j, jll = j >= 2 ? j - 2 : jl;
        const S value = qc2_value(qc2_stencil(u[i * W + j], u[i * W + jl], u[i * W + jll],
                                              u[it * W + j], u[itt * W + j], u[it * W + jl]), p);
        loss += a.loss_fid_scale * static_cast<double>(fid) + a.loss_qc_scale * static_cast<double>(value);
      }
    }
  }
  if (WITH_LOSS) deterministic_grid_sum(loss, a.partials, a.ticket, a.history, 1.0);
}

template <class S, bool WITH_LOSS>
__global__ void cgpm_c1_step_kernel(CgpmStep<S> a, Qc1Smem L) {
  extern __shared__ __align__(16) unsigned char gk_cgpm_smem[];
  S* s_ny = reinterpret_cast<S*>(gk_cgpm_smem);
  S* s_nx = s_ny + L.K;
  S* s_u = s_nx + L.K;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * (kQc1TileW - 1);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * (kQc1TileH - 1);
  const int64_t i = i0 + threadIdx.y, j = j0 + threadIdx.x, H = a.H, W = a.W;
  const bool writes = threadIdx.x < kQc1TileW - 1 && threadIdx.y < kQc1TileH - 1 && i < H && j < W;
  double loss = 0.0;
  for (int64_t plane = blockIdx.z; plane < a.planes; plane += gridDim.z) {
    const int64_t off = plane * H * W;
    qc1_stage<S, S>(a.u_cur + off, nullptr, H, W, i0, j0, L, s_ny, s_nx, s_u, nullptr);
    const Qc1Position<S> q = qc1_tile_position<S>(H, W, i0, j0, L, s_ny, s_nx, s_u, nullptr, a.qc_weight);
    const S g = qc1_tile_adjoint(q, i0, j0);
    if (writes) {
      const S fid = cgpm_adam_pixel(a, off + i * W + j, g);
      if (WITH_LOSS) {
        loss += a.loss_fid_scale * static_cast<double>(fid) + a.loss_qc_scale * static_cast<double>(q.value);
      }
    }
  }
  if (WITH_LOSS) deterministic_grid_sum(loss, a.partials, a.ticket, a.history, 1.0);
}

dim3 step_grid(int64_t planes, int64_t H, int64_t W, int tile_h, int tile_w) {
  const int64_t gx = (W + tile_w - 1) / tile_w, gy = (H + tile_h - 1) / tile_h;
  TORCH_CHECK_VALUE(gx <= 2147483647LL && gy <= 65535LL, "image of size ", H, "x", W,
                    " is too large for the CUDA tiling");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
              static_cast<unsigned>(std::min<int64_t>(planes, kMaxGridZ)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cgpm_steps_cuda(
    const at::Tensor& o_in, const at::Tensor& m_in, const at::Tensor& v_in, const at::Tensor& u0_in,
    int64_t first_step, int64_t steps, double lr, double beta1, double beta2, double adam_eps,
    double weight, int64_t order, double margin, double beta, double eps, double grad_threshold,
    c10::string_view activation, int64_t window, bool return_history) {
  check_cgpm_tensors(o_in, m_in, v_in, u0_in);
  TORCH_CHECK_VALUE(o_in.is_cuda(), "o must be a CUDA tensor");
  TORCH_CHECK_TYPE(o_in.scalar_type() == at::kFloat || o_in.scalar_type() == at::kDouble,
                   "o must be float32 or float64, got ", o_in.scalar_type());
  const CgpmConfig cfg = make_cgpm_config(first_step, steps, lr, beta1, beta2, adam_eps, weight,
                                          order, margin, beta, eps, grad_threshold, activation,
                                          window, return_history);
  c10::cuda::CUDAGuard guard(o_in.device());
  at::Tensor o = o_in.contiguous().clone();
  at::Tensor m = m_in.contiguous().clone();
  at::Tensor v = v_in.contiguous().clone();
  const at::Tensor u0 = u0_in.contiguous();
  at::Tensor history = at::zeros({return_history ? steps : 0}, o.options().dtype(at::kDouble));
  if (steps == 0) return {o, m, v, history.to(o.scalar_type())};
  at::Tensor u_cur = at::sigmoid(o);
  at::Tensor u_next = at::empty_like(o);
  const int64_t H = o.size(2), W = o.size(3), planes = o.size(0) * o.size(1);
  const double n = static_cast<double>(o.numel());
  const double n_qc = order == 1 ? n * static_cast<double>(window * window) : n;
  const dim3 block(kQc2TileW, kQc2TileH);  // == (kQc1TileW, kQc1TileH)
  static_assert(kQc2TileW == kQc1TileW && kQc2TileH == kQc1TileH, "one block shape for both");
  const dim3 grid = order == 2 ? step_grid(planes, H, W, kQc2TileH, kQc2TileW)
                               : step_grid(planes, H, W, kQc1TileH - 1, kQc1TileW - 1);
  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  at::Tensor partials;
  if (return_history) partials = reduction_partials(nblocks, o.options());
  const Qc1Smem L = qc1_smem_layout(static_cast<int>(order == 1 ? window : 1), false);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "cgpm_steps_cuda", [&] {
    using S = scalar_t;
    CgpmStep<S> a{};
    a.u0 = u0.data_ptr<S>();
    a.o = o.data_ptr<S>();
    a.m = m.data_ptr<S>();
    a.v = v.data_ptr<S>();
    a.planes = planes;
    a.H = H;
    a.W = W;
    a.qc_weight = static_cast<S>(weight / n_qc);
    a.fid_weight = static_cast<S>(2.0 / n);
    a.beta1 = static_cast<S>(beta1);
    a.one_minus_beta1 = static_cast<S>(1.0 - beta1);
    a.beta2 = static_cast<S>(beta2);
    a.one_minus_beta2 = static_cast<S>(1.0 - beta2);
    a.lr = static_cast<S>(lr);
    a.adam_eps = static_cast<S>(adam_eps);
    a.loss_fid_scale = 1.0 / n;
    a.loss_qc_scale = weight / n_qc;
    a.partials = return_history ? partials.data_ptr<double>() : nullptr;
    const Qc2Params<S> p{static_cast<S>(margin), static_cast<S>(beta), static_cast<S>(eps),
                         static_cast<S>(grad_threshold), cfg.relu};
    const size_t smem = static_cast<size_t>(L.count()) * sizeof(S);
    if (order == 1) {
      qc1_prepare_smem(cgpm_c1_step_kernel<S, false>, smem);
      qc1_prepare_smem(cgpm_c1_step_kernel<S, true>, smem);
    }
    S* cur = u_cur.data_ptr<S>();
    S* next = u_next.data_ptr<S>();
    for (int64_t s = 0; s < steps; ++s) {
      const double t = static_cast<double>(first_step + s + 1);
      a.bias1 = static_cast<S>(1.0 - std::pow(beta1, t));
      a.bias2 = static_cast<S>(1.0 - std::pow(beta2, t));
      a.u_cur = cur;
      a.u_next = next;
      if (return_history) {
        a.ticket = reduction_ticket(partials, nblocks, stream);
        a.history = history.data_ptr<double>() + s;
      }
      if (order == 2) {
        if (return_history) {
          cgpm_c2_step_kernel<S, true><<<grid, block, 0, stream>>>(a, p);
        } else {
          cgpm_c2_step_kernel<S, false><<<grid, block, 0, stream>>>(a, p);
        }
      } else {
        if (return_history) {
          cgpm_c1_step_kernel<S, true><<<grid, block, smem, stream>>>(a, L);
        } else {
          cgpm_c1_step_kernel<S, false><<<grid, block, smem, stream>>>(a, L);
        }
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(cur, next);
    }
  });
  return {o, m, v, history.to(o.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CUDA, m) {
  m.impl("cgpm_steps", &cgpm_steps_cuda);
}

}  // namespace cuda
}  // namespace geokernels
