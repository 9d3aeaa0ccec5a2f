// The qc2_loss gradient of one 32x8 tile (SPEC.md 1.2), as a device function shared by the
// qc2_loss backward kernel (qc_loss.cu) and the fused CGPM step (cgpm.cu).
//
// The per-pixel partials of the tile plus a 2-pixel bottom/right halo are computed once into
// shared memory with the templated math of qc2_math.h, then the adjoint stencils (see
// csrc/cpu/qc2_kernel.h for the algebra) gather them into grad u.
#pragma once

#include "geokernels/qc2_math.h"

namespace geokernels {
namespace cuda {

constexpr int kQc2TileW = 32, kQc2TileH = 8;  // output tile; blockDim = (kQc2TileW, kQc2TileH)

__device__ __forceinline__ int64_t qc2_clampi(int64_t v, int64_t hi) {
  return v < 0 ? 0 : (v > hi ? hi : v);
}

// grad u at (i0 + threadIdx.y, j0 + threadIdx.x) of sum_q w_q l_q over one plane, where w_q is
// grad[q] (grad non-null) or w_scalar. Every thread of the block must call it (it synchronises);
// the value is meaningless for pixels outside the image.
template <class scalar_t, class opmath_t>
__device__ opmath_t qc2_tile_grad(const scalar_t* __restrict__ u, const scalar_t* __restrict__ grad,
                                  opmath_t w_scalar, int64_t H, int64_t W, int64_t i0, int64_t j0,
                                  const Qc2Params<opmath_t>& p) {
  constexpr int TW = kQc2TileW, TH = kQc2TileH;
  constexpr int UR = TH + 4, UC = TW + 4;  // u rows i0-2 .. i0+TH+1
  constexpr int PR = TH + 2, PC = TW + 2;  // partials rows i0 .. i0+TH+1
  __shared__ opmath_t su[UR][UC];
  __shared__ opmath_t s_ax[PR][PC], s_ay[PR][PC], s_axx[PR][PC], s_ayy[PR][PC], s_am2[PR][PC];
  __shared__ opmath_t s_gux[TH][TW + 1], s_guy[TH + 1][TW];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * TW + tx;
  __syncthreads();  // the shared arrays may still be read by a previous call
  for (int k = tid; k < UR * UC; k += TW * TH) {
    const int r = k / UC, c = k % UC;
    const int64_t gi = qc2_clampi(i0 - 2 + r, H - 1), gj = qc2_clampi(j0 - 2 + c, W - 1);
    su[r][c] = static_cast<opmath_t>(u[gi * W + gj]);
  }
  __syncthreads();
  for (int k = tid; k < PR * PC; k += TW * TH) {
    const int pr = k / PC, pc = k % PC;
    const int64_t gi = i0 + pr, gj = j0 + pc;
    Qc2Partials<opmath_t> d{opmath_t(0), opmath_t(0), opmath_t(0), opmath_t(0), opmath_t(0)};
    if (gi < H && gj < W) {
      const int r = pr + 2, c = pc + 2;
      const int rt = gi >= 1 ? r - 1 : r, rtt = gi >= 2 ? r - 2 : rt;
      const int cl = gj >= 1 ? c - 1 : c, cll = gj >= 2 ? c - 2 : cl;
      const opmath_t w = grad ? static_cast<opmath_t>(grad[gi * W + gj]) : w_scalar;
      d = qc2_partials(qc2_stencil(su[r][c], su[r][cl], su[r][cll], su[rt][c], su[rtt][c], su[rt][cl]), p, w);
    }
    s_ax[pr][pc] = d.ax; s_ay[pr][pc] = d.ay; s_axx[pr][pc] = d.axx; s_ayy[pr][pc] = d.ayy;
    s_am2[pr][pc] = d.am * opmath_t(0.5);
  }
  __syncthreads();
  // GUX = a_x + Dx^T a_xx + Dy^T (a_m/2), zero where Dx^T drops it (column 0) or off-image
  for (int k = tid; k < TH * (TW + 1); k += TW * TH) {
    const int r = k / (TW + 1), c = k % (TW + 1);
    const int64_t gi = i0 + r, gj = j0 + c;
    opmath_t v = opmath_t(0);
    if (gi < H && gj < W && gj >= 1) {
      v = s_ax[r][c] + s_axx[r][c] - s_axx[r][c + 1] - s_am2[r + 1][c];
      if (gi >= 1) v += s_am2[r][c];
    }
    s_gux[r][c] = v;
  }
  // GUY = a_y + Dy^T a_yy + Dx^T (a_m/2), zero where Dy^T drops it (row 0) or off-image
  for (int k = tid; k < (TH + 1) * TW; k += TW * TH) {
    const int r = k / TW, c = k % TW;
    const int64_t gi = i0 + r, gj = j0 + c;
    opmath_t v = opmath_t(0);
    if (gi < H && gj < W && gi >= 1) {
      v = s_ay[r][c] + s_ayy[r][c] - s_ayy[r + 1][c] - s_am2[r][c + 1];
      if (gj >= 1) v += s_am2[r][c];
    }
    s_guy[r][c] = v;
  }
  __syncthreads();
  return s_gux[ty][tx] - s_gux[ty][tx + 1] + s_guy[ty][tx] - s_guy[ty + 1][tx];
}

}  // namespace cuda
}  // namespace geokernels
