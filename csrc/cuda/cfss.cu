// CUDA ops of the unrolled CFSS iterations (SPEC.md 2.4).
//
// Forward (cfss_steps_kernel): several iterations per launch by temporal blocking. A block stages
// u, q, T0, T1 of its output tile plus a halo of R = m * max(h, 1) pixels in shared memory, then
// runs m iterations there; each iteration's result is valid on a region max(h, 1) pixels smaller
// on every side (the Gaussian reaches h pixels, grad+ / div^- one), so after m iterations exactly
// the tile is valid. Per iteration: the dual update (in place, pointwise in q), the separable
// Gaussian (row pass into shared memory, then the column pass), the divergence and the sigmoid,
// all fused. The per-pixel arithmetic is the same whatever m is, so results do not depend on it.
// Backward (cfss_reverse_kernel): one launch per reverse step, the adjoint of one iteration
// (algebra in csrc/cpu/cfss_kernel.h); scalar-gradient sums are per-block partials in double,
// each block adding to its own slot (no atomics: deterministic), summed in order at the end.
// The host drivers (checkpoints, segment replay) mirror csrc/cpu/cfss.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <functional>
#include <tuple>
#include <vector>

#include "geokernels/cfss_math.h"
#include "geokernels/contour_flow_args.h"
#include "geokernels/contour_flow_math.h"
#include "geokernels/op_args.h"
#include "reduce.cuh"
#include "smem.cuh"

namespace geokernels {
namespace cuda {
namespace {

constexpr int TW = 32, TH = 16;        // output tile
constexpr int BX = 32, BY = 8;         // block of threads
constexpr int kMaxSteps = 8;           // iterations per forward launch, at most
constexpr int kMaxHalf = 16;           // largest Gaussian half size (taps in shared memory)
constexpr size_t kSmemBudget = 96 * 1024;
constexpr unsigned kMaxGridZ = 65535;

template <class S>
struct StepOut {
  S* u[kMaxSteps];  // where to write the state after sub-step s (null: keep it in shared memory)
  S* q[kMaxSteps];
};

__device__ __forceinline__ bool in_image(int64_t i, int64_t j, int64_t H, int64_t W) {
  return i >= 0 && i < H && j >= 0 && j < W;
}

template <class S>
__device__ __forceinline__ void load_taps(const S* params, int h, S* w, S* dw) {
  if (threadIdx.x == 0 && threadIdx.y == 0) cfss_gaussian_taps<S>(params[3], h, w, dw);
}

template <class S>
__global__ void cfss_steps_kernel(const S* __restrict__ o, const S* __restrict__ T,
                                  const S* __restrict__ params, const S* __restrict__ u_in,
                                  const S* __restrict__ q_in, bool init, int64_t planes, int64_t H,
                                  int64_t W, int h, int hp, int m, bool nonneg, StepOut<S> out,
                                  S* __restrict__ z_out) {
  extern __shared__ unsigned char smem_raw[];
  S* sm = reinterpret_cast<S*>(smem_raw);
  const int R = m * hp, RH = TH + 2 * R, RW = TW + 2 * R, RC = RH * RW;
  S* ua = sm;
  S* ub = ua + RC;
  S* qs = ub + RC;
  S* t0 = qs + RC;
  S* t1 = t0 + RC;
  S* hx = t1 + RC;
  S* w = hx + RC;
  S* dw = w + (2 * h + 1);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nth = blockDim.x * blockDim.y;
  const S eps = params[0], tau = params[1], lam = params[2];
  load_taps(params, h, w, dw);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * TH - R;  // global row of local row 0
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * TW - R;
  const int64_t hw = H * W;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t off = plane * hw;
    __syncthreads();
    for (int k = tid; k < RC; k += nth) {
      const int64_t gi = i0 + k / RW, gj = j0 + k % RW;
      S uu = S(0), qq = S(0), a = S(0), b = S(0);
      if (in_image(gi, gj, H, W)) {
        const int64_t g = gi * W + gj;
        if (init) {
          uu = gk_sigmoid(o[off + g] / eps);
        } else {
          uu = u_in[off + g];
          qq = q_in[off + g];
        }
        a = T[2 * off + g];
        b = T[2 * off + hw + g];
      }
      ua[k] = uu; qs[k] = qq; t0[k] = a; t1[k] = b;
    }
    __syncthreads();
    S* ucur = ua;
    S* unext = ub;
    for (int s = 1; s <= m; ++s) {
      const int e0 = (s - 1) * hp, e1 = s * hp;
      // dual update on [e0, RH-e0-1) x [e0, RW-e0-1), in place (pointwise in q)
      {
        const int nr = RH - 2 * e0 - 1, nc = RW - 2 * e0 - 1;
        for (int k = tid; k < nr * nc; k += nth) {
          const int lr = e0 + k / nc, lc = e0 + k % nc, c = lr * RW + lc;
          const S uc = ucur[c];
          const S d0 = ucur[c + RW] - uc, d1 = ucur[c + 1] - uc;
          S qn = qs[c] - tau * (t0[c] * d0 + t1[c] * d1);
          if (nonneg) qn = gk_max(qn, S(0));
          qs[c] = qn;
        }
      }
      // row pass of the Gaussian on rows [e1-h, RH-e1+h), cols [e1, RW-e1); v = 1-2u inside
      {
        const int r0 = e1 - h, nr = RH - 2 * e1 + 2 * h, nc = RW - 2 * e1;
        for (int k = tid; k < nr * nc; k += nth) {
          const int lr = r0 + k / nc, lc = e1 + k % nc;
          S acc = S(0);
          for (int b = -h; b <= h; ++b) {
            const int cc = lc + b;
            if (in_image(i0 + lr, j0 + cc, H, W)) acc += w[b + h] * (S(1) - S(2) * ucur[lr * RW + cc]);
          }
          hx[lr * RW + lc] = acc;
        }
      }
      __syncthreads();
      // column pass, divergence, z and sigmoid on [e1, RH-e1) x [e1, RW-e1)
      {
        const int nr = RH - 2 * e1, nc = RW - 2 * e1;
        const bool final_z = (s == m) && z_out != nullptr;
        for (int k = tid; k < nr * nc; k += nth) {
          const int lr = e1 + k / nc, lc = e1 + k % nc, c = lr * RW + lc;
          const int64_t gi = i0 + lr, gj = j0 + lc;
          const bool inside = in_image(gi, gj, H, W);
          S p = S(0);
          for (int a = -h; a <= h; ++a) p += w[a + h] * hx[(lr + a) * RW + lc];
          const S qc = qs[c];
          const S D = (t0[c] * qc - t0[c - RW] * qs[c - RW]) + (t1[c] * qc - t1[c - 1] * qs[c - 1]);
          const S oc = inside ? o[off + gi * W + gj] : S(0);
          const S z = (oc - lam * p - D) / eps;
          const bool own = lr >= R && lr < R + TH && lc >= R && lc < R + TW && inside;
          if (final_z) {
            if (own) z_out[off + gi * W + gj] = z;
          } else {
            const S un = inside ? gk_sigmoid(z) : S(0);
            unext[c] = un;
            if (own && out.u[s - 1] != nullptr) {
              out.u[s - 1][off + gi * W + gj] = un;
              out.q[s - 1][off + gi * W + gj] = qc;
            }
          }
        }
      }
      __syncthreads();
      S* tmp = ucur; ucur = unext; unext = tmp;
    }
  }
}

// The initial state u0 = sigmoid(o / eps), q0 = 0 (bit-identical to the forward's in-kernel init).
template <class S>
__global__ void cfss_init_kernel(const S* __restrict__ o, const S* __restrict__ params, int64_t n,
                                 S* __restrict__ u, S* __restrict__ q) {
  const S eps = params[0];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    u[i] = gk_sigmoid(o[i] / eps);
    q[i] = S(0);
  }
}

template <class S>
__global__ void cfss_reverse_kernel(const S* __restrict__ o, const S* __restrict__ T,
                                    const S* __restrict__ params, const S* __restrict__ u,
                                    const S* __restrict__ q, const S* __restrict__ A,
                                    const S* __restrict__ gq_in, int64_t planes, int64_t H,
                                    int64_t W, int h, int hp, bool nonneg, S* __restrict__ A_prev,
                                    S* __restrict__ gq_out, S* __restrict__ g_o,
                                    S* __restrict__ g_T, double* __restrict__ sums) {
  extern __shared__ unsigned char smem_raw[];
  S* sm = reinterpret_cast<S*>(smem_raw);
  const int RH = TH + 2 * hp, RW = TW + 2 * hp, RC = RH * RW;
  constexpr int YC = (TH + 1) * (TW + 1);
  S* su = sm;
  S* sA = su + RC;
  S* hxv = sA + RC;        // RH x TW: row pass of v on the tile's columns
  S* lyA = hxv + RH * TW;  // TH x RW: column pass of A on the tile's rows
  S* m0 = lyA + TH * RW;   // (TH+1) x (TW+1): rows i0-1.., cols j0-1..
  S* m1 = m0 + YC;
  S* n0 = m1 + YC;
  S* n1 = n0 + YC;
  S* w = n1 + YC;
  S* dw = w + (2 * h + 1);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nth = blockDim.x * blockDim.y;
  const S eps = params[0], tau = params[1], lam = params[2];
  load_taps(params, h, w, dw);
  const int64_t ti = static_cast<int64_t>(blockIdx.y) * TH, tj = static_cast<int64_t>(blockIdx.x) * TW;
  const int64_t i0 = ti - hp, j0 = tj - hp;  // global position of region cell (0, 0)
  const int64_t hw = H * W;
  double acc_za = 0.0, acc_rg = 0.0, acc_pa = 0.0, acc_sig = 0.0;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    const int64_t off = plane * hw;
    __syncthreads();
    for (int k = tid; k < RC; k += nth) {
      const int64_t gi = i0 + k / RW, gj = j0 + k % RW;
      const bool inside = in_image(gi, gj, H, W);
      su[k] = inside ? u[off + gi * W + gj] : S(0);
      sA[k] = inside ? A[off + gi * W + gj] : S(0);
    }
    __syncthreads();
    // adjoint of the dual update at rows ti-1 .., cols tj-1 .. (the tile and its top/left halo)
    for (int k = tid; k < YC; k += nth) {
      const int yr = k / (TW + 1), yc = k % (TW + 1);
      const int64_t gi = ti - 1 + yr, gj = tj - 1 + yc;
      S vm0 = S(0), vm1 = S(0), vn0 = S(0), vn1 = S(0);
      if (in_image(gi, gj, H, W)) {
        const int c = (yr + hp - 1) * RW + (yc + hp - 1);
        const int64_t g = gi * W + gj;
        const S uc = su[c];
        const S d0 = su[c + RW] - uc, d1 = su[c + 1] - uc;
        const S T0 = T[2 * off + g], T1 = T[2 * off + hw + g];
        const S r = T0 * d0 + T1 * d1;
        const S qtil = q[off + g] - tau * r;
        const S qt = nonneg ? gk_max(qtil, S(0)) : qtil;
        const S Ac = sA[c];
        const S gm0 = (sA[c + RW] - Ac) / eps, gm1 = (sA[c + 1] - Ac) / eps;
        S gq = T0 * gm0 + T1 * gm1;
        if (gq_in != nullptr) gq = gq_in[off + g] + gq;
        if (nonneg) gq = qtil > S(0) ? gq : S(0);
        const S gr = S(0) - tau * gq;
        vm0 = T0 * qt; vm1 = T1 * qt; vn0 = T0 * gr; vn1 = T1 * gr;
        if (yr >= 1 && yc >= 1) {
          gq_out[off + g] = gq;
          g_T[2 * off + g] += qt * gm0 + gr * d0;
          g_T[2 * off + hw + g] += qt * gm1 + gr * d1;
          acc_rg += static_cast<double>(r * gq);
        }
      }
      m0[k] = vm0; m1[k] = vm1; n0[k] = vn0; n1[k] = vn1;
    }
    // row pass of v (all region rows, tile columns) and column pass of A (tile rows, all columns)
    for (int k = tid; k < RH * TW; k += nth) {
      const int lr = k / TW, lc = hp + k % TW;
      S acc = S(0);
      for (int b = -h; b <= h; ++b)
        if (in_image(i0 + lr, j0 + lc + b, H, W)) acc += w[b + h] * (S(1) - S(2) * su[lr * RW + lc + b]);
      hxv[k] = acc;
    }
    for (int k = tid; k < TH * RW; k += nth) {
      const int lr = hp + k / RW, lc = k % RW;
      S acc = S(0);
      for (int a = -h; a <= h; ++a) acc += w[a + h] * sA[(lr + a) * RW + lc];
      lyA[k] = acc;
    }
    __syncthreads();
    for (int k = tid; k < TH * TW; k += nth) {
      const int r = k / TW, cc = k % TW;
      const int64_t gi = ti + r, gj = tj + cc;
      if (!in_image(gi, gj, H, W)) continue;
      const int lr = r + hp, lc = cc + hp, c = lr * RW + lc;
      S p = S(0), gv = S(0), hxd = S(0), lyd = S(0);
      for (int a = -h; a <= h; ++a) {
        p += w[a + h] * hxv[(lr + a) * TW + cc];
        gv += w[a + h] * lyA[r * RW + lc + a];
        if (in_image(gi, gj + a, H, W)) hxd += dw[a + h] * (S(1) - S(2) * su[c + a]);
        lyd += dw[a + h] * sA[c + a * RW];
      }
      const S hx = hxv[lr * TW + cc], ly = lyA[r * RW + lc];
      const int y = (r + 1) * (TW + 1) + (cc + 1);
      const S D = (m0[y] - m0[y - (TW + 1)]) + (m1[y] - m1[y - 1]);
      const S ndiv = (n0[y] - n0[y - (TW + 1)]) + (n1[y] - n1[y - 1]);
      const int64_t g = off + gi * W + gj;
      const S z = (o[g] - lam * p - D) / eps;
      const S Ac = sA[c], uc = su[c];
      const S gu = (S(2) * lam / eps) * gv - ndiv;
      A_prev[g] = gu * uc * (S(1) - uc);
      g_o[g] += Ac;
      acc_za += static_cast<double>(z * Ac);
      acc_pa += static_cast<double>(p * Ac);
      acc_sig += static_cast<double>(lyd * hx + ly * hxd);
    }
  }
  __shared__ double red[32];
  const double t_za = block_sum(acc_za, red);
  const double t_rg = block_sum(acc_rg, red);
  const double t_pa = block_sum(acc_pa, red);
  const double t_sig = block_sum(acc_sig, red);
  if (tid == 0) {
    const int64_t bid = blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z);
    sums[4 * bid + 0] += t_za;
    sums[4 * bid + 1] += t_rg;
    sums[4 * bid + 2] += t_pa;
    sums[4 * bid + 3] += t_sig;
  }
}

void check_inputs(const at::Tensor& o, const at::Tensor& T, const at::Tensor& params, int64_t iters,
                  int64_t halfsize, int64_t k) {
  check_image4d(o, "o");
  TORCH_CHECK_VALUE(o.is_cuda(), "o must be a CUDA tensor");
  TORCH_CHECK_TYPE(o.scalar_type() == at::kFloat || o.scalar_type() == at::kDouble,
                   "o must be float32 or float64, got ", o.scalar_type());
  check_flow_pairs(o, T, "o", "T");
  TORCH_CHECK_VALUE(params.numel() == 4 && params.device() == o.device(),
                    "params must hold [eps, tau, lam, sigma] on the device of o");
  TORCH_CHECK_VALUE(iters >= 0, "iters must be >= 0, got ", iters);
  TORCH_CHECK_VALUE(halfsize >= 0 && halfsize <= kMaxHalf, "halfsize must be in [0, ", kMaxHalf,
                    "] on CUDA, got ", halfsize);
  TORCH_CHECK_VALUE(k >= 0, "checkpoint_every must be >= 0 (0 = bisection), got ", k);
}

dim3 tile_grid(int64_t planes, int64_t H, int64_t W) {
  const int64_t gx = (W + TW - 1) / TW, gy = (H + TH - 1) / TH;
  TORCH_CHECK_VALUE(gx <= 2147483647LL && gy <= 65535LL, "image of size ", H, "x", W,
                    " is too large for the CUDA tiling");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
              static_cast<unsigned>(std::min<int64_t>(planes, kMaxGridZ)));
}

template <class S>
size_t steps_smem(int m, int h, int hp) {
  const size_t R = static_cast<size_t>(m) * hp;
  return (6 * (TH + 2 * R) * (TW + 2 * R) + 2 * (2 * h + 1)) * sizeof(S);
}

template <class S>
size_t reverse_smem(int h, int hp) {
  const size_t RH = TH + 2 * hp, RW = TW + 2 * hp;
  return (2 * RH * RW + RH * TW + TH * RW + 4 * (TH + 1) * (TW + 1) + 2 * (2 * h + 1)) * sizeof(S);
}

// Iterations per forward launch: GEOKERNELS_CFSS_STEPS_PER_LAUNCH if set (testing aid), else as
// many as keep the halo modest (R = m * max(h, 1) <= 8) and the window within kSmemBudget.
// The window also stays within what the device allows (99 KiB per block on sm_86/89 cards): at
// one iteration per launch a halfsize too large for the device is a ValueError, not a failed launch.
template <class S>
int steps_per_launch(int h, int hp) {
  int m = std::max(1, std::min(kMaxSteps, 8 / hp));
  if (const char* env = std::getenv("GEOKERNELS_CFSS_STEPS_PER_LAUNCH")) {
    const int v = std::atoi(env);
    if (v >= 1) m = std::min(kMaxSteps, v);
  }
  const size_t budget = std::min(kSmemBudget, max_dynamic_smem(cfss_steps_kernel<S>));
  while (m > 1 && steps_smem<S>(m, h, hp) > budget) --m;
  return m;
}

template <class F>
void set_smem(F* kernel, size_t bytes) {
  allow_dynamic_smem(kernel, bytes, "cfss_iterate on CUDA at this halfsize and dtype",
                     "use a smaller halfsize (sigma), float32, or the CPU backend");
}

template <class S>
struct CfssCuda {
  const S* o;
  const S* T;
  const S* params;
  int64_t planes, H, W;
  int h, hp;
  bool nonneg;
  cudaStream_t stream;

  // Runs iterations t_from+1 .. t_from+n from the state (u_in, q_in), or from the initial state
  // when init. dst(t) gives where the state after iteration t goes ({nullptr, nullptr}: not kept);
  // z_out receives z of iteration t_from+n when non-null.
  template <class Dst>
  void steps(const S* u_in, const S* q_in, bool init, int64_t t_from, int64_t n, const Dst& dst,
             S* z_out) const {
    const int mmax = steps_per_launch<S>(h, hp);
    const dim3 grid = tile_grid(planes, H, W), block(BX, BY);
    int64_t t = t_from;
    const S* ui = u_in;
    const S* qi = q_in;
    while (n > 0) {
      const int m = static_cast<int>(std::min<int64_t>(mmax, n));
      StepOut<S> out;
      for (int s = 0; s < kMaxSteps; ++s) { out.u[s] = nullptr; out.q[s] = nullptr; }
      const bool final_launch = n == m;
      for (int s = 0; s < m; ++s) {
        auto d = dst(t + s + 1);
        out.u[s] = d.first;
        out.q[s] = d.second;
      }
      S* zo = final_launch ? z_out : nullptr;
      TORCH_CHECK(zo != nullptr || out.u[m - 1] != nullptr,
                  "cfss: internal error, the state after a launch must be kept");
      const size_t smem = steps_smem<S>(m, h, hp);
      set_smem(cfss_steps_kernel<S>, smem);
      cfss_steps_kernel<S><<<grid, block, smem, stream>>>(o, T, params, ui, qi, init, planes, H, W, h,
                                                          hp, m, nonneg, out, zo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      init = false;
      ui = out.u[m - 1];
      qi = out.q[m - 1];
      t += m;
      n -= m;
    }
  }
};

std::tuple<at::Tensor, at::Tensor> cfss_forward_cuda(const at::Tensor& o_in, const at::Tensor& T_in,
                                                     const at::Tensor& params_in, int64_t iters,
                                                     int64_t halfsize, bool q_nonneg,
                                                     int64_t checkpoint_every, bool save_states) {
  check_inputs(o_in, T_in, params_in, iters, halfsize, checkpoint_every);
  c10::cuda::CUDAGuard guard(o_in.device());
  const at::Tensor o = o_in.contiguous();
  const at::Tensor T = T_in.to(o.scalar_type()).contiguous();
  const at::Tensor params = params_in.to(o.scalar_type()).contiguous();
  const int64_t B = o.size(0), C = o.size(1), H = o.size(2), W = o.size(3);
  const int64_t k = checkpoint_every;
  const int64_t n_saved = save_states ? cfss_num_saved(iters, k) : 0;
  at::Tensor states = at::empty({n_saved, 2, B, C, H, W}, o.options());
  if (iters == 0) return {o / params[0], states};
  at::Tensor z = at::empty_like(o);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "cfss_forward_cuda", [&] {
    using S = scalar_t;
    const int h = static_cast<int>(halfsize);
    const CfssCuda<S> run{o.data_ptr<S>(), T.data_ptr<S>(), params.data_ptr<S>(), B * C, H, W, h,
                          std::max(h, 1), q_nonneg, c10::cuda::getCurrentCUDAStream()};
    const int64_t n = o.numel();
    at::Tensor work = at::empty({2, 2, n}, o.options());  // ping-pong (u, q)
    S* wp = work.data_ptr<S>();
    S* sp = states.data_ptr<S>();
    const int mmax = steps_per_launch<S>(h, std::max(h, 1));
    auto dst = [&](int64_t t) -> std::pair<S*, S*> {
      if (t >= iters) return {nullptr, nullptr};
      if (n_saved > 0 && t % k == 0) {
        S* base = sp + (t / k - 1) * 2 * n;
        return {base, base + n};
      }
      if (t % mmax == 0) {  // end of a launch: alternate the ping-pong buffers
        S* base = wp + ((t / mmax) % 2) * 2 * n;
        return {base, base + n};
      }
      return {nullptr, nullptr};
    };
    // launches cover iterations (j*mmax, (j+1)*mmax]; run them one by one so that a launch's
    // last state always lands somewhere (ping-pong or a checkpoint)
    const S* ui = nullptr;
    const S* qi = nullptr;
    for (int64_t t0 = 0; t0 < iters; t0 += mmax) {
      const int64_t cnt = std::min<int64_t>(mmax, iters - t0);
      run.steps(ui, qi, t0 == 0, t0, cnt, dst, t0 + cnt == iters ? z.data_ptr<S>() : nullptr);
      auto last = dst(t0 + cnt);
      ui = last.first;
      qi = last.second;
    }
  });
  return {z, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfss_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& o_in, const at::Tensor& T_in,
    const at::Tensor& params_in, const at::Tensor& states_in, int64_t iters, int64_t halfsize,
    bool q_nonneg, int64_t checkpoint_every) {
  check_inputs(o_in, T_in, params_in, iters, halfsize, checkpoint_every);
  c10::cuda::CUDAGuard guard(o_in.device());
  const at::Tensor o = o_in.contiguous();
  const at::Tensor T = T_in.to(o.scalar_type()).contiguous();
  const at::Tensor params = params_in.to(o.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(grad_z.sizes() == o.sizes(), "grad_z must have the shape of o ", o.sizes(),
                    ", got ", grad_z.sizes());
  // states saved by a forward run with save_states=false (none): fall back to the bisection
  // schedule, which needs no saved state, so the op is always differentiable
  const bool none_saved = states_in.dim() == 6 && states_in.size(0) == 0;
  const int64_t k = none_saved ? 0 : checkpoint_every;
  const int64_t n_saved = cfss_num_saved(iters, k);
  TORCH_CHECK_VALUE(states_in.dim() == 6 && states_in.size(0) == n_saved && states_in.size(1) == 2 &&
                        states_in.numel() == n_saved * 2 * o.numel() && states_in.device() == o.device(),
                    "states must have shape (", n_saved, ", 2, B, C, H, W) for iters=", iters,
                    ", checkpoint_every=", k, ", got ", states_in.sizes());
  const at::Tensor states = states_in.to(o.scalar_type()).contiguous();
  const int64_t H = o.size(2), W = o.size(3), planes = o.size(0) * o.size(1), n = o.numel();
  at::Tensor g_o = at::zeros_like(o);
  at::Tensor g_T = at::zeros_like(T);
  const dim3 grid = tile_grid(planes, H, W), block(BX, BY);
  at::Tensor sums = at::zeros({static_cast<int64_t>(grid.x) * grid.y * grid.z, 4}, o.options().dtype(at::kDouble));
  at::Tensor A = grad_z.to(o.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "cfss_backward_cuda", [&] {
    using S = scalar_t;
    const int h = static_cast<int>(halfsize), hp = std::max(h, 1);
    auto stream = c10::cuda::getCurrentCUDAStream();
    const CfssCuda<S> run{o.data_ptr<S>(), T.data_ptr<S>(), params.data_ptr<S>(), planes, H, W, h,
                          hp, q_nonneg, stream};
    const bool bisect = k == 0;
    // whole-state buffers (u, q): two-level: the replayed segment (slot 0 = its start);
    // bisection: one slot per recursion depth, then the replay's ping-pong partner
    const int64_t n_buf = bisect ? cfss_bisection_slots(iters) + 1
                                 : std::min<int64_t>(k, std::max<int64_t>(iters, 1));
    at::Tensor buf = at::empty({n_buf, 2, n}, o.options());
    at::Tensor adj = at::empty({2, 2, n}, o.options());  // (A, gq) ping-pong
    S* bufp = buf.data_ptr<S>();
    S* adjp = adj.data_ptr<S>();
    const S* sp = states.data_ptr<S>();
    const S* A_cur = A.data_ptr<S>();
    const S* gq_cur = nullptr;
    int flip = 0;
    using Ref = std::pair<S*, S*>;
    auto slot = [&](int64_t j) -> Ref { return {bufp + j * 2 * n, bufp + j * 2 * n + n}; };
    const size_t smem = reverse_smem<S>(h, hp);
    set_smem(cfss_reverse_kernel<S>, smem);
    auto init_into = [&](const Ref& d) {
      const int threads = 256;
      const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
      cfss_init_kernel<S><<<blocks, threads, 0, stream>>>(o.data_ptr<S>(), params.data_ptr<S>(), n,
                                                          d.first, d.second);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto reverse = [&](const S* xu, const S* xq) {
      S* A_out = adjp + flip * 2 * n;
      S* gq_out = A_out + n;
      cfss_reverse_kernel<S><<<grid, block, smem, stream>>>(
          o.data_ptr<S>(), T.data_ptr<S>(), params.data_ptr<S>(), xu, xq, A_cur, gq_cur, planes, H,
          W, h, hp, q_nonneg, A_out, gq_out, g_o.data_ptr<S>(), g_T.data_ptr<S>(),
          sums.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      A_cur = A_out;
      gq_cur = gq_out;
      flip = 1 - flip;
    };
    if (bisect && iters >= 1) {
      const Ref work = slot(n_buf - 1);
      const int mmax = steps_per_launch<S>(h, hp);
      // n >= 1 iterations from src (null: the initial state, built in the kernel) into dst; the
      // launches' end states alternate between dst and work so that the last one lands in dst
      auto replay = [&](const Ref& src, int64_t t_from, int64_t cnt, const Ref& dst) {
        const int64_t nl = (cnt + mmax - 1) / mmax;
        run.steps(src.first, src.second, src.first == nullptr, t_from, cnt,
                  [&](int64_t t) -> Ref {
                    const int64_t d = t - t_from;
                    if (d % mmax != 0 && d != cnt) return {nullptr, nullptr};
                    const int64_t l = (d + mmax - 1) / mmax - 1;
                    return (nl - 1 - l) % 2 == 0 ? dst : work;
                  },
                  nullptr);
      };
      std::function<void(int64_t, const Ref&, int64_t, int)> reverse_range =
          [&](int64_t a, const Ref& sa, int64_t b, int depth) {
            if (b - a == 1) {
              if (sa.first == nullptr) {
                init_into(work);
                reverse(work.first, work.second);
              } else {
                reverse(sa.first, sa.second);
              }
              return;
            }
            const int64_t mid = a + (b - a) / 2;
            const Ref sm = slot(depth);
            replay(sa, a, mid - a, sm);
            reverse_range(mid, sm, b, depth + 1);
            reverse_range(a, sa, mid, depth);
          };
      reverse_range(0, Ref{nullptr, nullptr}, iters, 0);
    } else if (iters >= 1) {
      for (int64_t s = n_saved; s >= 0; --s) {
        const int64_t t0 = s * k, t1 = std::min((s + 1) * k, iters);
        std::vector<std::pair<const S*, const S*>> st(static_cast<size_t>(t1 - t0));
        if (s == 0) {
          init_into(slot(0));
          st[0] = slot(0);
        } else {
          const S* base = sp + (s - 1) * 2 * n;
          st[0] = {base, base + n};
        }
        if (t1 - t0 > 1) {  // replay the segment, keeping every state
          run.steps(st[0].first, st[0].second, false, t0, t1 - t0 - 1,
                    [&](int64_t t) -> Ref { return slot(t - t0); }, nullptr);
          for (int64_t t = t0 + 1; t < t1; ++t) st[t - t0] = slot(t - t0);
        }
        for (int64_t t = t1; t > t0; --t) reverse(st[t - t0 - 1].first, st[t - t0 - 1].second);
      }
    }
    if (iters >= 1) A = adj.select(0, 1 - flip).select(0, 0).reshape(o.sizes());
  });
  // the initial state's share (u0 = sigmoid(o / eps)), on the device: no host sync
  const at::Tensor pd = params.to(at::kDouble);
  const at::Tensor eps = pd[0], lam = pd[2];
  at::Tensor g_o_out = (g_o + A) / params[0];
  const at::Tensor tot = sums.sum(0);
  const at::Tensor s_za = tot[0] + ((o.to(at::kDouble) / eps) * A.to(at::kDouble)).sum();
  at::Tensor g_params = at::stack({-s_za / eps, -tot[1], -tot[2] / eps, -lam / eps * tot[3]})
                            .to(params_in.scalar_type());
  return {g_o_out, g_T.to(T_in.scalar_type()), g_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CUDA, m) {
  m.impl("cfss_forward", &cfss_forward_cuda);
  m.impl("cfss_backward", &cfss_backward_cuda);
}

}  // namespace cuda
}  // namespace geokernels
