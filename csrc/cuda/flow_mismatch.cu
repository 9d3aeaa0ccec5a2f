// CUDA ops of flow-mismatch scoring (SPEC.md 3). The noise is regenerated in every kernel from
// (seed, image, path) with the shared Philox/Box-Muller code of philox.h, bit-identical to the
// CPU kernels; nothing of size K*T is stored.
//
// Path building / noise: one thread per 4-element Philox group of one path.
// Reduction: one thread per 4 consecutive pixels of one image; for every path k and channel c
// it regenerates the 4 normals it needs (one Philox call, two when H*W is not a multiple of 4
// and the quad straddles groups), accumulates the mismatch and aggregates over k: min and mean
// in registers, an order statistic from per-thread columns in shared memory (or, for very large
// K, through a global (B, K, H, W) buffer and a second kernel). Every output pixel is written by
// one thread in a fixed order: deterministic, no float atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cpu/flow_mismatch_args.h"
#include "geokernels/philox.h"

namespace geokernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRankThreads = 128;
constexpr size_t kSharedLimit = 48 * 1024;

// Geometry and noise source of one launch (device-side mirror of the CPU FmGeometry).
template <class scalar_t>
struct FmDev {
  int64_t C, HW, K;
  uint64_t seed;
  int64_t image0;
  const scalar_t* noise;  // (B, K, C, H, W) or nullptr: regenerate
};

dim3 grid_for(int64_t threads_total, int block) {
  const int64_t blocks = (threads_total + block - 1) / block;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 30))));
}

__global__ void philox_kernel(const int64_t* __restrict__ counters, int64_t n, uint64_t seed,
                              int64_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t* c = counters + 4 * i;
    const Philox4 r = gk_philox4x32_10(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]),
                                       static_cast<uint32_t>(c[2]), static_cast<uint32_t>(c[3]),
                                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
#pragma unroll
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<int64_t>(r.x[j]);
  }
}

// noise (paths == nullptr) or x_t = a eps + t x (paths given) for `count` paths from path_start.
template <class scalar_t, class opmath_t>
__global__ void paths_kernel(FmDev<scalar_t> g, const scalar_t* __restrict__ x, int64_t path_start,
                             int64_t count, opmath_t a, opmath_t t, bool noise_only,
                             scalar_t* __restrict__ out) {
  const int64_t CHW = g.C * g.HW;
  const int64_t groups = (CHW + 3) / 4;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < count * groups;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t local = idx / groups, grp = idx % groups;
    const int64_t n = path_start + local, b = n / g.K, k = n % g.K;
    const int64_t e0 = grp * 4;
    const int valid = static_cast<int>(CHW - e0 < 4 ? CHW - e0 : 4);
    float eps[4] = {0.f, 0.f, 0.f, 0.f};
    if (!g.noise) {
      gk_philox_normals4(g.seed, static_cast<uint32_t>(g.image0 + b), static_cast<uint32_t>(k),
                         static_cast<uint64_t>(grp), eps);
    }
    scalar_t* o = out + local * CHW + e0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (i < valid) {
        if (noise_only) {
          o[i] = static_cast<scalar_t>(eps[i]);
        } else {
          // explicit noise keeps its own precision (float64 noise stays float64)
          const opmath_t e = g.noise ? static_cast<opmath_t>(g.noise[n * CHW + e0 + i])
                                     : static_cast<opmath_t>(eps[i]);
          o[i] = static_cast<scalar_t>(a * e + t * static_cast<opmath_t>(x[b * CHW + e0 + i]));
        }
      }
    }
  }
}

// The 4 eps values of elements e0 .. e0+3 (valid of them) of path n = b K + k.
template <class scalar_t, class opmath_t>
__device__ __forceinline__ void eps_quad(const FmDev<scalar_t>& g, int64_t n, int64_t b, int64_t k,
                                         int64_t e0, int valid, opmath_t eps[4]) {
  if (g.noise) {
    const scalar_t* src = g.noise + n * g.C * g.HW + e0;
#pragma unroll
    for (int i = 0; i < 4; ++i) eps[i] = i < valid ? static_cast<opmath_t>(src[i]) : opmath_t(0);
    return;
  }
  const uint64_t grp = static_cast<uint64_t>(e0) >> 2;
  const int o = static_cast<int>(e0 & 3);  // uniform across a warp (depends on c and H*W only)
  float m[8];
  gk_philox_normals4(g.seed, static_cast<uint32_t>(g.image0 + b), static_cast<uint32_t>(k), grp, m);
  if (o != 0 && o + valid > 4) {
    gk_philox_normals4(g.seed, static_cast<uint32_t>(g.image0 + b), static_cast<uint32_t>(k), grp + 1,
                       m + 4);
  } else {
#pragma unroll
    for (int i = 4; i < 8; ++i) m[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float v = o == 0 ? m[i] : (o == 1 ? m[i + 1] : (o == 2 ? m[i + 2] : m[i + 3]));
    eps[i] = static_cast<opmath_t>(v);
  }
}

// d[i] = sum_c (v - (x - eps))^2 for pixels p0 .. p0+3 of path n.
template <class scalar_t, class opmath_t>
__device__ __forceinline__ void mismatch_quad(const FmDev<scalar_t>& g, const scalar_t* __restrict__ v_path,
                                              const scalar_t* __restrict__ x_img, int64_t n, int64_t b,
                                              int64_t k, int64_t p0, int valid, opmath_t d[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) d[i] = opmath_t(0);
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t off = c * g.HW + p0;
    opmath_t eps[4];
    eps_quad<scalar_t, opmath_t>(g, n, b, k, off, valid, eps);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (i < valid) {
        const opmath_t diff = static_cast<opmath_t>(v_path[off + i]) -
                              (static_cast<opmath_t>(x_img[off + i]) - eps[i]);
        d[i] += diff * diff;
      }
    }
  }
}

// mismatches are written in opmath (float32 for float16/bfloat16 x): no rounding before the rank
template <class scalar_t, class opmath_t>
__global__ void delta_kernel(FmDev<scalar_t> g, const scalar_t* __restrict__ v,
                             const scalar_t* __restrict__ x, int64_t path_start, int64_t count,
                             opmath_t* __restrict__ out) {
  const int64_t quads = (g.HW + 3) / 4, CHW = g.C * g.HW;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < count * quads;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t local = idx / quads, p0 = (idx % quads) * 4;
    const int valid = static_cast<int>(g.HW - p0 < 4 ? g.HW - p0 : 4);
    const int64_t n = path_start + local, b = n / g.K, k = n % g.K;
    opmath_t d[4];
    mismatch_quad<scalar_t, opmath_t>(g, v + local * CHW, x + b * CHW, n, b, k, p0, valid, d);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (i < valid) out[local * g.HW + p0 + i] = d[i];
  }
}

template <class T>
__device__ __forceinline__ bool not_finite(T v) {
  return !(v < std::numeric_limits<T>::infinity());  // mismatches are >= 0 or NaN
}

// The rank-th smallest (1-based, ties by index) of K values at d[k * stride]; NaN if any is NaN.
template <class T>
__device__ __forceinline__ T select_rank(const T* d, int64_t stride, int64_t K, int64_t rank) {
  T res = T(0);
  bool nan_seen = false;
  for (int64_t k = 0; k < K; ++k) {
    const T dk = d[k * stride];
    nan_seen |= dk != dk;
    int64_t cnt = 0;
    for (int64_t j = 0; j < K; ++j) {
      const T dj = d[j * stride];
      cnt += (dj < dk) || (j < k && dj == dk);
    }
    if (cnt == rank - 1) res = dk;
  }
  return nan_seen ? std::numeric_limits<T>::quiet_NaN() : res;
}

// Fused: heat[b, p] += weight * agg_k mismatch(b, k, p). RANK_IN_SHARED: order statistic from
// per-thread columns of dynamic shared memory; else min (rank == 1) or mean in registers.
template <class scalar_t, class opmath_t, bool RANK_IN_SHARED>
__global__ void accumulate_kernel(FmDev<scalar_t> g, opmath_t* __restrict__ heat,
                                  const scalar_t* __restrict__ v, const scalar_t* __restrict__ x,
                                  int64_t B, opmath_t weight, int64_t rank, bool mean,
                                  bool* __restrict__ nonfinite) {
  extern __shared__ unsigned char smem_raw[];
  opmath_t* cols = reinterpret_cast<opmath_t*>(smem_raw);
  const int64_t quads = (g.HW + 3) / 4, CHW = g.C * g.HW;
  // shared-memory columns are private to a thread: no block synchronisation is needed
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * quads;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / quads, p0 = (idx % quads) * 4;
    const int valid = static_cast<int>(g.HW - p0 < 4 ? g.HW - p0 : 4);
    opmath_t acc[4];
    bool bad = false;
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t n = b * g.K + k;
      opmath_t d[4];
      mismatch_quad<scalar_t, opmath_t>(g, v + n * CHW, x + b * CHW, n, b, k, p0, valid, d);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (i < valid) bad |= not_finite(d[i]);
        if (RANK_IN_SHARED) {
          cols[(k * blockDim.x + threadIdx.x) * 4 + i] = d[i];
        } else if (k == 0) {
          acc[i] = d[i];
        } else if (mean) {
          acc[i] += d[i];
        } else {
          acc[i] = (d[i] < acc[i] || d[i] != d[i]) ? d[i] : acc[i];  // NaN-propagating min
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (i >= valid) continue;
      opmath_t res;
      if (RANK_IN_SHARED) {
        res = select_rank(cols + threadIdx.x * 4 + i, static_cast<int64_t>(blockDim.x) * 4, g.K, rank);
      } else {
        res = mean ? acc[i] / static_cast<opmath_t>(g.K) : acc[i];
      }
      heat[b * g.HW + p0 + i] += weight * res;
    }
    if (bad) *nonfinite = true;  // benign race: every writer stores the same value
  }
}

template <class scalar_t, class opmath_t>
__global__ void aggregate_kernel(opmath_t* __restrict__ heat, const scalar_t* __restrict__ delta,
                                 int64_t B, int64_t K, int64_t HW, opmath_t weight, int64_t rank,
                                 bool mean, bool* __restrict__ nonfinite) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * HW;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / HW, p = idx % HW;
    const scalar_t* d = delta + b * K * HW + p;
    bool bad = false;
    opmath_t acc = static_cast<opmath_t>(d[0]);
    bad |= not_finite(acc);
    for (int64_t k = 1; k < K; ++k) {
      const opmath_t dk = static_cast<opmath_t>(d[k * HW]);
      bad |= not_finite(dk);
      if (mean) acc += dk;
      else acc = (dk < acc || dk != dk) ? dk : acc;
    }
    opmath_t res;
    if (mean) {
      res = acc / static_cast<opmath_t>(K);
    } else if (rank == 1) {
      res = acc;
    } else {
      // order statistic straight from global memory (reads are coalesced across threads)
      res = opmath_t(0);
      bool nan_seen = false;
      for (int64_t k = 0; k < K; ++k) {
        const opmath_t dk = static_cast<opmath_t>(d[k * HW]);
        nan_seen |= dk != dk;
        int64_t cnt = 0;
        for (int64_t j = 0; j < K; ++j) {
          const opmath_t dj = static_cast<opmath_t>(d[j * HW]);
          cnt += (dj < dk) || (j < k && dj == dk);
        }
        if (cnt == rank - 1) res = dk;
      }
      if (nan_seen) res = std::numeric_limits<opmath_t>::quiet_NaN();
    }
    heat[idx] += weight * res;
    if (bad) *nonfinite = true;
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernels");
}

template <class scalar_t>
FmDev<scalar_t> device_geometry(const FmShape& s, int64_t seed, int64_t image_offset,
                                const at::Tensor& noise) {
  return {s.C, s.HW(), s.K, static_cast<uint64_t>(seed), image_offset,
          noise.defined() ? noise.data_ptr<scalar_t>() : nullptr};
}

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

at::Tensor philox4x32_10_cuda(const at::Tensor& counters_in, int64_t seed) {
  TORCH_CHECK_VALUE(counters_in.dim() == 2 && counters_in.size(1) == 4,
                    "counters must have shape (N, 4), got ", counters_in.sizes());
  TORCH_CHECK_TYPE(counters_in.scalar_type() == at::kLong, "counters must be int64, got ",
                   counters_in.scalar_type());
  check_cuda(counters_in, "counters");
  c10::cuda::CUDAGuard guard(counters_in.device());
  const at::Tensor counters = counters_in.contiguous();
  at::Tensor out = at::empty_like(counters);
  const int64_t n = counters.size(0);
  if (n == 0) return out;
  philox_kernel<<<grid_for(n, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      counters.data_ptr<int64_t>(), n, static_cast<uint64_t>(seed), out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void launch_paths(const at::Tensor& x, const at::Tensor& noise, const FmShape& s, int64_t seed,
                  int64_t image_offset, int64_t path_start, int64_t count, double t, bool noise_only,
                  at::Tensor& out) {
  const int64_t groups = (s.C * s.HW() + 3) / 4;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_mismatch_paths_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    paths_kernel<scalar_t, opmath_t><<<grid_for(count * groups, kThreads), kThreads, 0, stream>>>(
        device_geometry<scalar_t>(s, seed, image_offset, noise), x.data_ptr<scalar_t>(), path_start,
        count, static_cast<opmath_t>(1.0 - t), static_cast<opmath_t>(t), noise_only,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor flow_mismatch_noise_cuda(const at::Tensor& x_in, int64_t seed, int64_t image_offset,
                                    int64_t num_paths) {
  const FmShape s = check_fm_x(x_in, num_paths, image_offset);
  check_cuda(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({s.B, s.K, s.C, s.H, s.W}, x.options());
  launch_paths(x, at::Tensor(), s, seed, image_offset, 0, s.B * s.K, 0.0, true, out);
  return out;
}

at::Tensor flow_mismatch_paths_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& noise_in,
                                    double t, int64_t seed, int64_t image_offset, int64_t num_paths,
                                    int64_t path_start, int64_t path_count) {
  const FmShape s = check_fm_x(x_in, num_paths, image_offset);
  check_cuda(x_in, "x");
  check_fm_noise(noise_in, x_in, s);
  check_fm_path_range(s, path_start, path_count);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor noise = contiguous_or_undefined(noise_in);
  at::Tensor out = at::empty({path_count, s.C, s.H, s.W}, x.options());
  if (path_count == 0) return out;
  launch_paths(x, noise, s, seed, image_offset, path_start, path_count, t, false, out);
  return out;
}

at::Tensor flow_mismatch_delta_cuda(const at::Tensor& v_in, const at::Tensor& x_in,
                                    const c10::optional<at::Tensor>& noise_in, int64_t seed,
                                    int64_t image_offset, int64_t num_paths, int64_t path_start) {
  const FmShape s = check_fm_x(x_in, num_paths, image_offset);
  check_cuda(x_in, "x");
  check_fm_noise(noise_in, x_in, s);
  TORCH_CHECK_VALUE(v_in.dim() == 4, "v must have shape (paths, C, H, W), got ", v_in.sizes());
  const int64_t count = v_in.size(0);
  check_fm_path_range(s, path_start, count);
  check_fm_velocity(v_in, x_in, s, count);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  const at::Tensor noise = contiguous_or_undefined(noise_in);
  // mismatches in opmath: float32 for float16/bfloat16 x (no rounding before the rank)
  at::Tensor out = at::empty({count, s.H, s.W}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (count == 0) return out;
  const int64_t quads = (s.HW() + 3) / 4;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_mismatch_delta_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    delta_kernel<scalar_t, opmath_t><<<grid_for(count * quads, kThreads), kThreads, 0, stream>>>(
        device_geometry<scalar_t>(s, seed, image_offset, noise), v.data_ptr<scalar_t>(),
        x.data_ptr<scalar_t>(), path_start, count, out.data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void launch_aggregate(at::Tensor& work, const at::Tensor& delta, double weight, int64_t rank,
                      bool mean, at::Tensor& flag) {
  const int64_t B = delta.size(0), K = delta.size(1), HW = delta.size(2) * delta.size(3);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "flow_mismatch_aggregate_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    aggregate_kernel<scalar_t, opmath_t><<<grid_for(B * HW, kThreads), kThreads, 0, stream>>>(
        work.data_ptr<opmath_t>(), delta.data_ptr<scalar_t>(), B, K, HW,
        static_cast<opmath_t>(weight), rank, mean, flag.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor flow_mismatch_accumulate_cuda(at::Tensor& heat, const at::Tensor& v_in, const at::Tensor& x_in,
                                         const c10::optional<at::Tensor>& noise_in, double weight,
                                         int64_t seed, int64_t image_offset, int64_t num_paths,
                                         int64_t rank, bool mean) {
  const FmShape s = check_fm_x(x_in, num_paths, image_offset);
  check_cuda(x_in, "x");
  check_fm_noise(noise_in, x_in, s);
  check_fm_velocity(v_in, x_in, s, s.B * s.K);
  check_fm_heat(heat, x_in.scalar_type(), x_in.device(), s.B, s.H, s.W);
  check_fm_rank(rank, mean, s.K);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  const at::Tensor noise = contiguous_or_undefined(noise_in);
  at::Tensor work = heat.is_contiguous() ? heat : heat.contiguous();
  at::Tensor flag = at::zeros({}, x.options().dtype(at::kBool));
  const int64_t quads = (s.HW() + 3) / 4;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flow_mismatch_accumulate_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto geo = device_geometry<scalar_t>(s, seed, image_offset, noise);
    const bool order_statistic = !mean && rank != 1;
    if (!order_statistic) {
      accumulate_kernel<scalar_t, opmath_t, false><<<grid_for(s.B * quads, kThreads), kThreads, 0, stream>>>(
          geo, work.data_ptr<opmath_t>(), v.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), s.B,
          static_cast<opmath_t>(weight), rank, mean, flag.data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    int threads = kRankThreads;
    auto smem = [&](int t) { return static_cast<size_t>(s.K) * t * 4 * sizeof(opmath_t); };
    while (threads > 32 && smem(threads) > kSharedLimit) threads /= 2;
    if (smem(threads) <= kSharedLimit) {
      accumulate_kernel<scalar_t, opmath_t, true><<<grid_for(s.B * quads, threads), threads, smem(threads), stream>>>(
          geo, work.data_ptr<opmath_t>(), v.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), s.B,
          static_cast<opmath_t>(weight), rank, mean, flag.data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // very large K: mismatches through a global (B, K, H, W) buffer, then the aggregate kernel.
    // The buffer is in opmath like the shared-memory path and Triton's: a float16 one rounded
    // every mismatch before the rank (and turned those above 65504 into inf).
    at::Tensor delta = at::empty({s.B, s.K, s.H, s.W}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    delta_kernel<scalar_t, opmath_t><<<grid_for(s.B * s.K * quads, kThreads), kThreads, 0, stream>>>(
        geo, v.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), 0, s.B * s.K, delta.data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_aggregate(work, delta, weight, rank, mean, flag);
  });
  if (!work.is_same(heat)) heat.copy_(work);
  return flag;
}

at::Tensor flow_mismatch_aggregate_cuda(at::Tensor& heat, const at::Tensor& delta_in, double weight,
                                        int64_t rank, bool mean) {
  TORCH_CHECK_VALUE(delta_in.dim() == 4 && delta_in.numel() > 0,
                    "delta must have shape (B, K, H, W), got ", delta_in.sizes());
  check_cuda(delta_in, "delta");
  TORCH_CHECK_TYPE(at::isFloatingType(delta_in.scalar_type()), "delta must be floating point, got ",
                   delta_in.scalar_type());
  const int64_t B = delta_in.size(0), K = delta_in.size(1), H = delta_in.size(2), W = delta_in.size(3);
  check_fm_heat(heat, delta_in.scalar_type(), delta_in.device(), B, H, W);
  check_fm_rank(rank, mean, K);
  c10::cuda::CUDAGuard guard(delta_in.device());
  const at::Tensor delta = delta_in.contiguous();
  at::Tensor work = heat.is_contiguous() ? heat : heat.contiguous();
  at::Tensor flag = at::zeros({}, delta.options().dtype(at::kBool));
  launch_aggregate(work, delta, weight, rank, mean, flag);
  if (!work.is_same(heat)) heat.copy_(work);
  return flag;
}

}  // namespace

TORCH_LIBRARY_IMPL(geokernels, CUDA, m) {
  m.impl("philox4x32_10", &philox4x32_10_cuda);
  m.impl("flow_mismatch_noise", &flow_mismatch_noise_cuda);
  m.impl("flow_mismatch_paths", &flow_mismatch_paths_cuda);
  m.impl("flow_mismatch_delta", &flow_mismatch_delta_cuda);
  m.impl("flow_mismatch_accumulate_", &flow_mismatch_accumulate_cuda);
  m.impl("flow_mismatch_aggregate_", &flow_mismatch_aggregate_cuda);
}

}  // namespace cuda
}  // namespace geokernels
