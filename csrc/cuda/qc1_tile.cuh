// qc1_loss (SPEC.md 1.3) tile functions shared by the qc1_loss kernels (qc1_loss.cu) and the
// fused CGPM step (cgpm.cu). The math is qc1_math.h (the same templates as the CPU kernels).
//
// A block of 32x8 threads stages u on its tile plus a window/2 + 1 halo into dynamic shared
// memory (u outside the image = 0), with the offsets' unit directions; nothing of size
// K = window^2 per pixel is ever stored.
//   forward: one thread per pixel of the 32x8 tile, one sigmoid per offset pair.
//   backward: thread (tx, ty) computes T, AX, AY at position (i0 + ty, j0 + tx); the adjoint
//             grad = T + Dx^T AX + Dy^T AY needs AX one column right and AY one row down, so
//             a block outputs the 31x7 interior of its 32x8 positions (the last row and column
//             are recomputed by the neighbouring block: 18% more work, one pass, no halo loop).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include "geokernels/qc1_math.h"
#include "smem.cuh"

namespace geokernels {
namespace cuda {

constexpr int kQc1TileW = 32, kQc1TileH = 8;

// Dynamic shared memory of a qc1 block: directions (2K) + staged u (+ staged weights).
struct Qc1Smem {
  int R, window, K, SR, SC;
  bool weight_map;
  __host__ __device__ int64_t count() const {
    return 2 * static_cast<int64_t>(K) + static_cast<int64_t>(SR) * SC * (weight_map ? 2 : 1);
  }
};

inline Qc1Smem qc1_smem_layout(int window, bool weight_map) {
  const int R = window / 2;
  return {R, window, window * window, kQc1TileH + 2 * R + 1, kQc1TileW + 2 * R + 1, weight_map};
}

// Lets the kernel use `bytes` of dynamic shared memory; clear error if the device cannot.
template <class Kernel>
void qc1_prepare_smem(Kernel* kernel, size_t bytes) {
  allow_dynamic_smem(kernel, bytes, "the window of the CUDA qc1 kernel",
                     "use a smaller window or backend='triton'");
}

// Stages u (and the weight map) rows i0-R-1 .. i0+TH-1+R, columns j0-R-1 .. j0+TW-1+R, and the
// direction table, after a barrier (the arrays may still be read by a previous call).
template <class scalar_t, class opmath_t>
__device__ void qc1_stage(const scalar_t* __restrict__ u, const scalar_t* __restrict__ wmap,
                          int64_t H, int64_t W, int64_t i0, int64_t j0, const Qc1Smem& L,
                          opmath_t* s_ny, opmath_t* s_nx, opmath_t* s_u, opmath_t* s_w) {
  const int tid = threadIdx.y * kQc1TileW + threadIdx.x, nthreads = kQc1TileW * kQc1TileH;
  __syncthreads();
  for (int k = tid; k < L.K; k += nthreads) {
    const Qc1Direction<opmath_t> n = qc1_direction<opmath_t>(k / L.window - L.R, k % L.window - L.R);
    s_ny[k] = n.ny;
    s_nx[k] = n.nx;
  }
  for (int k = tid; k < L.SR * L.SC; k += nthreads) {
    const int r = k / L.SC, c = k % L.SC;
    const int64_t gi = i0 - L.R - 1 + r, gj = j0 - L.R - 1 + c;
    const bool inside = gi >= 0 && gi < H && gj >= 0 && gj < W;
    s_u[k] = inside ? static_cast<opmath_t>(u[gi * W + gj]) : opmath_t(0);
    if (wmap) s_w[k] = inside ? static_cast<opmath_t>(wmap[gi * W + gj]) : opmath_t(0);
  }
  __syncthreads();
}

// Loss map value l at the thread's pixel (i0 + ty, j0 + tx), after qc1_stage.
template <class opmath_t>
__device__ opmath_t qc1_tile_value(int64_t H, int64_t W, int64_t i0, int64_t j0, const Qc1Smem& L,
                                   const opmath_t* s_ny, const opmath_t* s_nx, const opmath_t* s_u) {
  const int r = threadIdx.y + L.R + 1, c = threadIdx.x + L.R + 1;
  const int64_t gi = i0 + threadIdx.y, gj = j0 + threadIdx.x;
  if (gi >= H || gj >= W) return opmath_t(0);
  const opmath_t uc = s_u[r * L.SC + c];
  const opmath_t ux = gj >= 1 ? uc - s_u[r * L.SC + c - 1] : opmath_t(0);
  const opmath_t uy = gi >= 1 ? uc - s_u[(r - 1) * L.SC + c] : opmath_t(0);
  opmath_t acc = opmath_t(0);
  for (int dy = 0; dy <= L.R; ++dy) {
    for (int dx = (dy == 0 ? 1 : -L.R); dx <= L.R; ++dx) {  // one offset of each pair {d, -d}
      const int k = (dy + L.R) * L.window + (dx + L.R);
      const Qc1Direction<opmath_t> n{s_ny[k], s_nx[k]};
      acc += qc1_pair_value(ux, uy, uc, s_u[(r + dy) * L.SC + c + dx], s_u[(r - dy) * L.SC + c - dx], n);
    }
  }
  return acc;
}

// T, AX, AY (and the loss value) at the thread's position, after qc1_stage.
template <class opmath_t>
struct Qc1Position {
  opmath_t t, ax, ay, value;
};

template <class opmath_t>
__device__ Qc1Position<opmath_t> qc1_tile_position(int64_t H, int64_t W, int64_t i0, int64_t j0,
                                                   const Qc1Smem& L, const opmath_t* s_ny,
                                                   const opmath_t* s_nx, const opmath_t* s_u,
                                                   const opmath_t* s_w, opmath_t w_scalar) {
  const int r = threadIdx.y + L.R + 1, c = threadIdx.x + L.R + 1;
  const int64_t gi = i0 + threadIdx.y, gj = j0 + threadIdx.x;
  Qc1Position<opmath_t> out{opmath_t(0), opmath_t(0), opmath_t(0), opmath_t(0)};
  if (gi >= H || gj >= W) return out;  // off-image positions contribute nothing
  const int SC = L.SC;
  const opmath_t uc = s_u[r * SC + c];
  const opmath_t ux = gj >= 1 ? uc - s_u[r * SC + c - 1] : opmath_t(0);
  const opmath_t uy = gi >= 1 ? uc - s_u[(r - 1) * SC + c] : opmath_t(0);
  const opmath_t wc = s_w ? s_w[r * SC + c] : w_scalar;
  Qc1GradAcc<opmath_t> acc{opmath_t(0), opmath_t(0), opmath_t(0), opmath_t(0)};
  for (int dy = -L.R; dy <= L.R; ++dy) {
    const int64_t ni = gi + dy;
    const int rr = r + dy;
    for (int dx = -L.R; dx <= L.R; ++dx) {
      if (dy == 0 && dx == 0) continue;
      const int64_t nj = gj + dx;
      const int cc = c + dx;
      const int k = (dy + L.R) * L.window + (dx + L.R);
      const Qc1Direction<opmath_t> n{s_ny[k], s_nx[k]};
      const bool inside = ni >= 0 && ni < H && nj >= 0 && nj < W;
      const opmath_t un = s_u[rr * SC + cc];
      const opmath_t uxn = nj >= 1 ? un - s_u[rr * SC + cc - 1] : opmath_t(0);
      const opmath_t uyn = ni >= 1 ? un - s_u[(rr - 1) * SC + cc] : opmath_t(0);
      const opmath_t wn = s_w ? s_w[rr * SC + cc] : (inside ? w_scalar : opmath_t(0));
      qc1_grad_accumulate(acc, uc, un, qc1_alignment(ux, uy, n), qc1_alignment(uxn, uyn, n), wc,
                          wn, n);
    }
  }
  out.t = acc.t;
  out.ax = -wc * acc.sx;
  out.ay = -wc * acc.sy;
  out.value = acc.value;
  return out;
}

// grad u = T + Dx^T AX + Dy^T AY at the thread's position; valid for threads with
// tx < kQc1TileW - 1 and ty < kQc1TileH - 1 (the block's 31x7 output interior).
template <class opmath_t>
__device__ opmath_t qc1_tile_adjoint(const Qc1Position<opmath_t>& q, int64_t i0, int64_t j0) {
  __shared__ opmath_t s_ax[kQc1TileH][kQc1TileW], s_ay[kQc1TileH][kQc1TileW];
  const int tx = threadIdx.x, ty = threadIdx.y;
  __syncthreads();  // a previous call may still read s_ax / s_ay
  s_ax[ty][tx] = q.ax;
  s_ay[ty][tx] = q.ay;
  __syncthreads();
  if (tx >= kQc1TileW - 1 || ty >= kQc1TileH - 1) return opmath_t(0);
  const int64_t gi = i0 + ty, gj = j0 + tx;
  opmath_t g = q.t - s_ax[ty][tx + 1] - s_ay[ty + 1][tx];
  if (gj >= 1) g += q.ax;
  if (gi >= 1) g += q.ay;
  return g;
}

}  // namespace cuda
}  // namespace geokernels
