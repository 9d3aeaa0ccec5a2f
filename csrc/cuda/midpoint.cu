// CUDA ops of local midpoint convexification (SPEC.md 1.6). Per-pixel rules: the shared
// csrc/cpu/midpoint_common.h (same comparisons in the same order as the CPU kernels).
//
// mode "jacobi": one launch per sweep. A 32x32 output tile plus a floor(r) halo is staged in
// shared memory (global reads with bounds tests when the tile does not fit in 48 KiB). As on the
// CPU, a tile with no changed pixel within reach in the previous sweep is skipped without even a
// copy: the output buffer still holds its values from two sweeps ago, which are current.
//
// mode "fast": one launch per pass; every block loads its tile and halo once and runs Jacobi
// sweeps on the tile in shared memory (halo frozen) until the tile stops changing (at most
// kLocalSweeps), then writes it out. Blocks read the previous pass's buffer and write the other,
// so a pass is deterministic; run to convergence it reaches the Jacobi fixed point (the operator
// is monotone and extensive) in far fewer launches. Sources are tracked in shared memory as local
// cell indices and resolved to input pixels when the tile is written.
//
// Convergence without a host sync per sweep: a 5-word device state holds the largest change of
// the last three sweeps (a ring, atomicMax on the bits of non-negative doubles), a sticky
// "stopped" flag and the number of sweeps run. Every launch first decides from the previous
// sweep's change whether the iteration has stopped (all blocks reach the same decision) and then
// does nothing. The host launches kSyncEvery sweeps between reads of the flag, and picks the
// result buffer by the parity of the sweep count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/midpoint_common.h"
#include "geokernels/op_args.h"

namespace geokernels {
namespace cuda {
namespace {

constexpr int TW = 32, TH = 32;           // output tile
constexpr int BX = 32, BY = 8;            // threads; each thread owns TH / BY rows
constexpr int RPT = TH / BY;              // rows per thread
constexpr int kNumWarps = BX * BY / 32;
constexpr int kSyncEvery = 8;             // sweeps between host reads of the stopped flag
constexpr int kLocalSweeps = 64;          // cap of the in-tile sweeps of one "fast" pass
// dynamic shared memory per block without opting in (48 KiB), less room for the static arrays
constexpr size_t kSmemLimit = 46 * 1024;
constexpr unsigned kMaxGridZ = 65535;

// device state words
constexpr int kStopped = 3, kSweeps = 4, kStateWords = 5;

struct Geometry {
  int64_t planes, H, W;
  int R, K, tiles_x, tiles_y, reach_tx, reach_ty;
  __host__ __device__ int64_t tiles() const { return static_cast<int64_t>(tiles_x) * tiles_y; }
};

__device__ __forceinline__ bool first_thread_of_grid() {
  return blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0 &&
         threadIdx.y == 0;
}

// Has the iteration stopped before this sweep? Same answer in every block of the launch.
__device__ __forceinline__ bool iteration_stopped(const unsigned long long* state, int64_t sweep,
                                                  double tol) {
  if (state[kStopped] != 0ULL) return true;
  return sweep >= 2 && __longlong_as_double(static_cast<long long>(state[(sweep - 1) % 3])) <= tol;
}

// Called by every block after iteration_stopped() returned false.
__device__ __forceinline__ void begin_sweep(unsigned long long* state, int64_t sweep) {
  if (first_thread_of_grid()) {
    state[(sweep + 1) % 3] = 0ULL;  // the slot of sweep s-2, read by nobody in this launch
    state[kSweeps] = static_cast<unsigned long long>(sweep);
  }
}

__device__ __forceinline__ void mark_stopped(unsigned long long* state) {
  if (first_thread_of_grid()) state[kStopped] = 1ULL;
}

// Block-wide max of a non-negative double, folded into state[slot] by one atomicMax.
__device__ void block_max_into(double v, unsigned long long* state, int64_t slot) {
  __shared__ double warp_max[kNumWarps];
  const int tid = threadIdx.y * BX + threadIdx.x;
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if ((tid & 31) == 0) warp_max[tid >> 5] = v;
  __syncthreads();
  if (tid == 0) {
    double m = warp_max[0];
    for (int w = 1; w < kNumWarps; ++w) m = fmax(m, warp_max[w]);
    if (m > 0.0) atomicMax(state + slot, static_cast<unsigned long long>(__double_as_longlong(m)));
  }
}

// Any tile within reach of (tx, ty) changed in the previous sweep? Uniform across the block.
__device__ bool tile_dirty(const uint8_t* changed_prev, const Geometry& g, int tx, int ty) {
  __shared__ int dirty;
  const int tid = threadIdx.y * BX + threadIdx.x;
  __syncthreads();
  if (tid == 0) dirty = 0;
  __syncthreads();
  const int nx = 2 * g.reach_tx + 1, ny = 2 * g.reach_ty + 1;
  for (int k = tid; k < nx * ny; k += BX * BY) {
    const int y = ty - g.reach_ty + k / nx, x = tx - g.reach_tx + k % nx;
    if (y >= 0 && y < g.tiles_y && x >= 0 && x < g.tiles_x &&
        changed_prev[static_cast<int64_t>(y) * g.tiles_x + x])
      dirty = 1;
  }
  __syncthreads();
  return dirty != 0;
}

// Byte offset of the local-source array behind the value tile in the "fast" kernel's memory.
__host__ __device__ inline size_t lsrc_offset(size_t cells, size_t value_bytes) {
  return (cells * value_bytes + 15) / 16 * 16;
}

// Reads of the sweep input around pixel q, zero outside the image.
template <class scalar_t>
struct SharedReader {  // tile + halo staged in shared memory; (r, c) = q in tile coordinates
  const scalar_t* tile;
  int stride, r, c;
  __host__ __device__ scalar_t operator()(int dy, int dx) const { return tile[(r + dy) * stride + c + dx]; }
};
template <class scalar_t>
struct GlobalReader {
  const scalar_t* plane;
  int64_t H, W, i, j;
  __host__ __device__ scalar_t operator()(int dy, int dx) const {
    const int64_t y = i + dy, x = j + dx;
    return (y >= 0 && y < H && x >= 0 && x < W) ? plane[y * W + x] : scalar_t(0);
  }
};

// The change u' - u as the reference computes it: in the dtype (half/bfloat16 round the float
// difference), then widened for the tolerance test.
template <class scalar_t>
__device__ __forceinline__ double change_of(scalar_t nv, scalar_t ov) {
  using opmath_t = at::opmath_type<scalar_t>;
  return static_cast<double>(static_cast<scalar_t>(static_cast<opmath_t>(nv) - static_cast<opmath_t>(ov)));
}

// ---- Jacobi: one sweep per launch ------------------------------------------------------------
template <class scalar_t, bool SMEM, bool TRACK>
__global__ void __launch_bounds__(BX * BY) midpoint_jacobi_kernel(
    const scalar_t* __restrict__ in, scalar_t* __restrict__ out, const int64_t* __restrict__ src_in,
    int64_t* __restrict__ src_out, const int* __restrict__ pairs, Geometry g,
    const uint8_t* __restrict__ changed_prev, uint8_t* __restrict__ changed_now,
    unsigned long long* state, int64_t sweep, double tol) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem_raw);
  if (iteration_stopped(state, sweep, tol)) {
    mark_stopped(state);
    return;
  }
  begin_sweep(state, sweep);
  const int* pdy = pairs;
  const int* pdx = pairs + g.K;
  const int tx = blockIdx.x, ty = blockIdx.y;
  const int64_t i0 = static_cast<int64_t>(ty) * TH, j0 = static_cast<int64_t>(tx) * TW;
  const int SW = TW + 2 * g.R, SH = TH + 2 * g.R;
  const int tid = threadIdx.y * BX + threadIdx.x;
  for (int64_t plane = blockIdx.z; plane < g.planes; plane += gridDim.z) {
    const int64_t off = plane * g.H * g.W;
    const int64_t tile_id = plane * g.tiles() + static_cast<int64_t>(ty) * g.tiles_x + tx;
    if (sweep >= 2 && !tile_dirty(changed_prev + plane * g.tiles(), g, tx, ty)) {
      if (tid == 0) changed_now[tile_id] = 0;
      continue;  // unchanged within reach: `out` still holds the current values (see top)
    }
    if (SMEM) {
      __syncthreads();
      for (int k = tid; k < SH * SW; k += BX * BY) {
        const int64_t y = i0 - g.R + k / SW, x = j0 - g.R + k % SW;
        tile[k] = (y >= 0 && y < g.H && x >= 0 && x < g.W) ? in[off + y * g.W + x] : scalar_t(0);
      }
      __syncthreads();
    }
    double change = 0.0;
    bool changed = false;
    for (int rr = 0; rr < RPT; ++rr) {
      const int r = threadIdx.y + rr * BY, c = threadIdx.x;
      const int64_t i = i0 + r, j = j0 + c;
      if (i >= g.H || j >= g.W) continue;
      const int64_t q = off + i * g.W + j;
      scalar_t old, best;
      int64_t src = 0;
      if (SMEM) {
        const SharedReader<scalar_t> at{tile, SW, r + g.R, c + g.R};
        old = at(0, 0);
        best = midpoint_best<scalar_t>(at, old, pdy, pdx, g.K);
        if (TRACK && best > old) {
          const int rank = midpoint_source_rank<scalar_t>(at, best, pdy, pdx, g.K);
          int ey = 0, ex = 0;
          if (rank >= 0) {
            const int k = rank < g.K ? rank : 2 * g.K - 1 - rank;
            ey = rank < g.K ? pdy[k] : -pdy[k];
            ex = rank < g.K ? pdx[k] : -pdx[k];
          }
          const int64_t y = i + ey, x = j + ex;
          src = (y >= 0 && y < g.H && x >= 0 && x < g.W) ? src_in[off + y * g.W + x] : -1;
        }
      } else {
        const GlobalReader<scalar_t> at{in + off, g.H, g.W, i, j};
        old = at(0, 0);
        best = midpoint_best<scalar_t>(at, old, pdy, pdx, g.K);
        if (TRACK && best > old) {
          const int rank = midpoint_source_rank<scalar_t>(at, best, pdy, pdx, g.K);
          int ey = 0, ex = 0;
          if (rank >= 0) {
            const int k = rank < g.K ? rank : 2 * g.K - 1 - rank;
            ey = rank < g.K ? pdy[k] : -pdy[k];
            ex = rank < g.K ? pdx[k] : -pdx[k];
          }
          const int64_t y = i + ey, x = j + ex;
          src = (y >= 0 && y < g.H && x >= 0 && x < g.W) ? src_in[off + y * g.W + x] : -1;
        }
      }
      out[q] = best;
      if (best > old) {
        changed = true;
        change = fmax(change, change_of(best, old));
        if (TRACK) src_out[q] = src;
      } else if (TRACK) {
        src_out[q] = src_in[q];
      }
    }
    const bool any = __syncthreads_or(changed) != 0;
    if (tid == 0) changed_now[tile_id] = any ? 1 : 0;
    block_max_into(change, state, sweep % 3);
  }
}

// ---- fast: in-tile sweeps to a local fixed point per launch ------------------------------------
template <class scalar_t, bool TRACK>
__global__ void __launch_bounds__(BX * BY) midpoint_fast_kernel(
    const scalar_t* __restrict__ in, scalar_t* __restrict__ out, const int64_t* __restrict__ src_in,
    int64_t* __restrict__ src_out, const int* __restrict__ pairs, Geometry g,
    const uint8_t* __restrict__ changed_prev, uint8_t* __restrict__ changed_now,
    unsigned long long* state, int64_t pass, double tol) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int SW = TW + 2 * g.R, SH = TH + 2 * g.R;
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem_raw);
  // local source: the tile cell (index into tile) each value is a copy of
  int* lsrc = reinterpret_cast<int*>(smem_raw + lsrc_offset(static_cast<size_t>(SH) * SW, sizeof(scalar_t)));
  if (iteration_stopped(state, pass, tol)) {
    mark_stopped(state);
    return;
  }
  begin_sweep(state, pass);
  const int* pdy = pairs;
  const int* pdx = pairs + g.K;
  const int tx = blockIdx.x, ty = blockIdx.y;
  const int64_t i0 = static_cast<int64_t>(ty) * TH, j0 = static_cast<int64_t>(tx) * TW;
  const int tid = threadIdx.y * BX + threadIdx.x;
  for (int64_t plane = blockIdx.z; plane < g.planes; plane += gridDim.z) {
    const int64_t off = plane * g.H * g.W;
    const int64_t tile_id = plane * g.tiles() + static_cast<int64_t>(ty) * g.tiles_x + tx;
    if (pass >= 2 && !tile_dirty(changed_prev + plane * g.tiles(), g, tx, ty)) {
      if (tid == 0) changed_now[tile_id] = 0;
      continue;
    }
    __syncthreads();
    for (int k = tid; k < SH * SW; k += BX * BY) {
      const int64_t y = i0 - g.R + k / SW, x = j0 - g.R + k % SW;
      tile[k] = (y >= 0 && y < g.H && x >= 0 && x < g.W) ? in[off + y * g.W + x] : scalar_t(0);
      if (TRACK) lsrc[k] = k;
    }
    __syncthreads();
    scalar_t first[RPT];  // the pass's input values of this thread's pixels
    for (int rr = 0; rr < RPT; ++rr)
      first[rr] = tile[(threadIdx.y + rr * BY + g.R) * SW + threadIdx.x + g.R];
    for (int local = 0; local < kLocalSweeps; ++local) {
      scalar_t nv[RPT];
      int ns[RPT];
      bool changed = false;
      for (int rr = 0; rr < RPT; ++rr) {
        const int r = threadIdx.y + rr * BY, c = threadIdx.x;
        const int cell = (r + g.R) * SW + c + g.R;
        const SharedReader<scalar_t> at{tile, SW, r + g.R, c + g.R};
        const scalar_t old = at(0, 0);
        nv[rr] = old;
        ns[rr] = TRACK ? lsrc[cell] : 0;
        if (i0 + r >= g.H || j0 + c >= g.W) continue;  // off-image cells stay 0
        const scalar_t best = midpoint_best<scalar_t>(at, old, pdy, pdx, g.K);
        if (best > old) {
          changed = true;
          nv[rr] = best;
          if (TRACK) {
            const int rank = midpoint_source_rank<scalar_t>(at, best, pdy, pdx, g.K);
            if (rank >= 0) {
              const int k = rank < g.K ? rank : 2 * g.K - 1 - rank;
              const int ey = rank < g.K ? pdy[k] : -pdy[k];
              const int ex = rank < g.K ? pdx[k] : -pdx[k];
              ns[rr] = lsrc[cell + ey * SW + ex];
            }
          }
        }
      }
      const bool any = __syncthreads_or(changed) != 0;  // every read of this sweep is done
      if (!any) break;
      for (int rr = 0; rr < RPT; ++rr) {
        const int cell = (threadIdx.y + rr * BY + g.R) * SW + threadIdx.x + g.R;
        tile[cell] = nv[rr];
        if (TRACK) lsrc[cell] = ns[rr];
      }
      __syncthreads();
    }
    double change = 0.0;
    bool changed = false;
    for (int rr = 0; rr < RPT; ++rr) {
      const int r = threadIdx.y + rr * BY, c = threadIdx.x;
      const int64_t i = i0 + r, j = j0 + c;
      if (i >= g.H || j >= g.W) continue;
      const int cell = (r + g.R) * SW + c + g.R;
      const scalar_t v = tile[cell];
      out[off + i * g.W + j] = v;
      if (v > first[rr]) {
        changed = true;
        change = fmax(change, change_of(v, first[rr]));
      }
      if (TRACK) {  // local cell -> input pixel of this pass -> its source
        const int l = lsrc[cell];
        const int64_t y = i0 - g.R + l / SW, x = j0 - g.R + l % SW;
        src_out[off + i * g.W + j] =
            (y >= 0 && y < g.H && x >= 0 && x < g.W) ? src_in[off + y * g.W + x] : -1;
      }
    }
    const bool any = __syncthreads_or(changed) != 0;
    if (tid == 0) changed_now[tile_id] = any ? 1 : 0;
    block_max_into(change, state, pass % 3);
  }
}

// ---- backward: deterministic scatter-add through a stable sort ----------------------------------
// keys are sorted stably, so each run of equal keys lists its output pixels in row-major order;
// one thread per run sums them in that order (the CPU kernel's order: bit-identical results).
template <class scalar_t>
__global__ void segment_sum_kernel(const int64_t* __restrict__ keys, const scalar_t* __restrict__ grad,
                                   scalar_t* __restrict__ out, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t key = keys[p];
    if (p > 0 && keys[p - 1] == key) continue;
    opmath_t acc = opmath_t(0);
    for (int64_t k = p; k < n && keys[k] == key; ++k) acc += static_cast<opmath_t>(grad[k]);
    out[key] = static_cast<scalar_t>(acc);
  }
}

void check_args(const at::Tensor& u, double radius, int64_t max_iters, double tol) {
  check_image4d(u, "u");
  TORCH_CHECK_VALUE(u.is_cuda(), "u must be a CUDA tensor");
  TORCH_CHECK_VALUE(radius >= 0.0 && radius <= kMidpointMaxRadius,
                    "radius must be in [0, ", kMidpointMaxRadius, "], got ", radius);
  TORCH_CHECK_VALUE(max_iters >= 0, "max_iters must be >= 0, got ", max_iters);
  TORCH_CHECK_VALUE(tol >= 0.0, "tol must be >= 0, got ", tol);
}

MidpointMode parse_mode(c10::string_view mode) {
  if (mode == "jacobi") return MidpointMode::Jacobi;
  if (mode == "fast") return MidpointMode::Fast;
  TORCH_CHECK_VALUE(false, "mode must be 'jacobi' or 'fast', got '", std::string(mode), "'");
  return MidpointMode::Jacobi;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> midpoint_convexify_forward_cuda(
    const at::Tensor& u_in, double radius, int64_t max_iters, double tol, c10::string_view mode,
    bool track_sources) {
  check_args(u_in, radius, max_iters, tol);
  const MidpointMode md = parse_mode(mode);
  c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous();
  Geometry g;
  g.planes = u.size(0) * u.size(1);
  g.H = u.size(2);
  g.W = u.size(3);
  g.R = midpoint_reach(radius);
  const int64_t tiles_x = (g.W + TW - 1) / TW, tiles_y = (g.H + TH - 1) / TH;
  TORCH_CHECK_VALUE(tiles_x <= 2147483647LL && tiles_y <= 65535LL, "image of size ", g.H, "x", g.W,
                    " is too large for the CUDA tiling (H <= ", 65535 * TH, ")");
  g.tiles_x = static_cast<int>(tiles_x);
  g.tiles_y = static_cast<int>(tiles_y);
  g.reach_tx = (g.R + TW - 1) / TW;
  g.reach_ty = (g.R + TH - 1) / TH;
  const std::vector<MidpointOffset> offsets = midpoint_pair_offsets(radius);
  g.K = static_cast<int>(offsets.size());
  std::vector<int> host_pairs(2 * offsets.size() + 1, 0);
  for (size_t k = 0; k < offsets.size(); ++k) {
    host_pairs[k] = offsets[k].dy;
    host_pairs[offsets.size() + k] = offsets[k].dx;
  }
  const at::Tensor pairs =
      at::tensor(host_pairs, at::TensorOptions().dtype(at::kInt)).to(u.device(), /*non_blocking=*/false);

  // both buffers start as sweep 0 (the skipped-tile argument needs it)
  at::Tensor bufs[2] = {u.clone(), u.clone()};
  at::Tensor srcs[2];
  if (track_sources) {
    srcs[0] = at::arange(g.H * g.W, u.options().dtype(at::kLong)).view({1, 1, g.H, g.W})
                  .expand(u.sizes()).contiguous();
    srcs[1] = srcs[0].clone();
  }
  at::Tensor flags = at::ones({2, g.planes * g.tiles()}, u.options().dtype(at::kByte));
  at::Tensor state = at::zeros({kStateWords}, u.options().dtype(at::kLong));
  auto* state_ptr = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>());
  const dim3 grid(g.tiles_x, g.tiles_y, static_cast<unsigned>(std::min<int64_t>(g.planes, kMaxGridZ)));
  const dim3 block(BX, BY);
  const size_t cells = static_cast<size_t>(TH + 2 * g.R) * (TW + 2 * g.R);
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "midpoint_convexify_forward_cuda", [&] {
    const size_t tile_bytes = cells * sizeof(scalar_t);
    const size_t fast_bytes =
        track_sources ? lsrc_offset(cells, sizeof(scalar_t)) + cells * sizeof(int) : tile_bytes;
    // "fast" needs the tile in shared memory; beyond that it runs the Jacobi schedule
    const bool fast = md == MidpointMode::Fast && fast_bytes <= kSmemLimit;
    const bool smem = tile_bytes <= kSmemLimit;
    for (int64_t s = 1; s <= max_iters; ++s) {
      const at::Tensor& in = bufs[(s - 1) % 2];
      const at::Tensor& out = bufs[s % 2];
      const int64_t* sin = track_sources ? srcs[(s - 1) % 2].data_ptr<int64_t>() : nullptr;
      int64_t* sout = track_sources ? srcs[s % 2].data_ptr<int64_t>() : nullptr;
      const uint8_t* fprev = flags[(s - 1) % 2].data_ptr<uint8_t>();
      uint8_t* fnow = flags[s % 2].data_ptr<uint8_t>();
      const scalar_t* ip = in.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const int* pp = pairs.data_ptr<int>();
      if (fast) {
        if (track_sources) {
          midpoint_fast_kernel<scalar_t, true><<<grid, block, fast_bytes, stream>>>(
              ip, op, sin, sout, pp, g, fprev, fnow, state_ptr, s, tol);
        } else {
          midpoint_fast_kernel<scalar_t, false><<<grid, block, fast_bytes, stream>>>(
              ip, op, sin, sout, pp, g, fprev, fnow, state_ptr, s, tol);
        }
      } else if (smem) {
        if (track_sources) {
          midpoint_jacobi_kernel<scalar_t, true, true><<<grid, block, tile_bytes, stream>>>(
              ip, op, sin, sout, pp, g, fprev, fnow, state_ptr, s, tol);
        } else {
          midpoint_jacobi_kernel<scalar_t, true, false><<<grid, block, tile_bytes, stream>>>(
              ip, op, sin, sout, pp, g, fprev, fnow, state_ptr, s, tol);
        }
      } else {
        if (track_sources) {
          midpoint_jacobi_kernel<scalar_t, false, true><<<grid, block, 0, stream>>>(
              ip, op, sin, sout, pp, g, fprev, fnow, state_ptr, s, tol);
        } else {
          midpoint_jacobi_kernel<scalar_t, false, false><<<grid, block, 0, stream>>>(
              ip, op, sin, sout, pp, g, fprev, fnow, state_ptr, s, tol);
        }
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (s % kSyncEvery == 0 && s < max_iters && state[kStopped].item<int64_t>() != 0) break;
    }
  });
  const int64_t sweeps = state[kSweeps].item<int64_t>();  // the one host sync at the end
  at::Tensor sources = track_sources ? srcs[sweeps % 2] : at::empty({0}, u.options().dtype(at::kLong));
  return {bufs[sweeps % 2], sources, state[kSweeps].clone()};
}

at::Tensor midpoint_convexify_backward_cuda(const at::Tensor& grad_in, const at::Tensor& sources_in) {
  check_image4d(grad_in, "grad");
  TORCH_CHECK_VALUE(grad_in.is_cuda() && sources_in.device() == grad_in.device(),
                    "grad and sources must be on the same CUDA device");
  TORCH_CHECK_TYPE(sources_in.scalar_type() == at::kLong, "sources must be int64, got ",
                   sources_in.scalar_type());
  TORCH_CHECK_VALUE(sources_in.sizes() == grad_in.sizes(), "sources must have the shape of grad ",
                    grad_in.sizes(), ", got ", sources_in.sizes(),
                    " (was the forward run with track_sources=True?)");
  c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t planes = grad.size(0) * grad.size(1), n = grad.size(2) * grad.size(3);
  const at::Tensor src = sources_in.reshape({planes, n});
  // sources -1 (outside) and, defensively, out-of-range values go to a dropped sentinel slot
  // (no value check here: that would need a host sync)
  const int64_t sentinel = planes * n;
  const at::Tensor plane_base = at::arange(planes, src.options()).mul_(n).view({planes, 1});
  const at::Tensor keys = at::where(src.ge(0).logical_and_(src.lt(n)), src + plane_base,
                                    at::scalar_tensor(sentinel, src.options())).reshape({-1});
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_keys = std::get<0>(sorted);
  const at::Tensor grad_sorted = grad.reshape({-1}).index_select(0, std::get<1>(sorted));
  at::Tensor out = at::zeros({planes * n + 1}, grad.options());
  const int64_t total = keys.numel();
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "midpoint_convexify_backward_cuda", [&] {
    segment_sum_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        sorted_keys.data_ptr<int64_t>(), grad_sorted.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.narrow(0, 0, planes * n).view(grad.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CUDA, m) {
  m.impl("midpoint_convexify_forward", &midpoint_convexify_forward_cuda);
  m.impl("midpoint_convexify_backward", &midpoint_convexify_backward_cuda);
}

}  // namespace cuda
}  // namespace geokernels
