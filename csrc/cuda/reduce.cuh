// Deterministic single-launch reductions for CUDA loss kernels.
//
// Each block reduces its values (fixed shuffle tree), writes one partial, and the last block to
// finish (ticket from an atomic counter) sums the partials in index order. No float atomics, so
// the result is bit-identical run to run, and a loss is ONE kernel launch (no memset, no second
// reduction kernel). Counters come from a per-device pool of slots; the last block resets its
// slot, and consecutive calls take different slots, so concurrent launches on several streams do
// not share a counter (the pool is far larger than the number of kernels a GPU can run at once).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <atomic>
#include <mutex>

namespace geokernels {
namespace cuda {

constexpr int kTicketSlots = 4096;

// Partials of a grid reduction over `nblocks` blocks, plus one spare element that holds the
// block counter while a CUDA graph is being captured (see reduction_ticket).
inline at::Tensor reduction_partials(int64_t nblocks, const at::TensorOptions& options) {
  return at::empty({nblocks + 1}, options.dtype(at::kDouble));
}

// A zeroed counter for one reduction launch on `stream`, made by reduction_partials(nblocks).
// Normally a slot of a per-device pool (no memset launch: the last block re-zeroes it). While
// `stream` is being captured into a CUDA graph, the pool is not touched (its first use allocates
// and synchronises, which capture forbids, and a slot baked into a graph would be shared with
// later eager calls): the counter is the spare element of `partials`, zeroed by a captured
// memset on every replay and owned by the graph like every other buffer it allocated.
inline unsigned int* reduction_ticket(const at::Tensor& partials, int64_t nblocks, cudaStream_t stream) {
  TORCH_CHECK(partials.numel() == nblocks + 1 && partials.scalar_type() == at::kDouble,
              "geokernels: internal error, partials must come from reduction_partials");
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    unsigned int* spare = reinterpret_cast<unsigned int*>(partials.data_ptr<double>() + nblocks);
    C10_CUDA_CHECK(cudaMemsetAsync(spare, 0, sizeof(unsigned int), stream));
    return spare;
  }
  static std::mutex mu;
  static unsigned int* pools[64] = {nullptr};
  static std::atomic<unsigned int> next{0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  TORCH_CHECK(dev >= 0 && dev < 64, "geokernels: device index ", dev, " out of range");
  {
    std::lock_guard<std::mutex> lock(mu);
    if (pools[dev] == nullptr) {
      unsigned int* p = nullptr;
      C10_CUDA_CHECK(cudaMalloc(&p, kTicketSlots * sizeof(unsigned int)));  // lives as long as the process
      C10_CUDA_CHECK(cudaMemset(p, 0, kTicketSlots * sizeof(unsigned int)));
      C10_CUDA_CHECK(cudaDeviceSynchronize());  // once per device: the slots are zero before use
      pools[dev] = p;
    }
  }
  return pools[dev] + (next.fetch_add(1, std::memory_order_relaxed) % kTicketSlots);
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block in a fixed order; the total is valid in thread 0. `smem` holds 32 values.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if ((tid & 31) == 0) smem[tid >> 5] = v;
  __syncthreads();
  const int nwarps = (nthreads + 31) >> 5;
  T r = tid < nwarps ? smem[tid] : T(0);
  if (tid < 32) r = warp_sum(r);
  return r;
}

// Called by every thread of every block after computing `v` (its share of the total). Block b
// stores its partial in partials[b]; the last block writes scale * sum(partials) to *out.
template <class T, class Out>
__device__ __forceinline__ void deterministic_grid_sum(T v, T* partials, unsigned int* ticket,
                                                       Out* out, T scale) {
  __shared__ T smem[32];
  __shared__ bool is_last;
  const unsigned int nblocks = gridDim.x * gridDim.y * gridDim.z;
  const unsigned int bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int tid = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  T total = block_sum(v, smem);
  if (tid == 0) {
    partials[bid] = total;
    __threadfence();  // publish the partial before taking a ticket
    is_last = atomicAdd(ticket, 1u) == nblocks - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  T acc = T(0);
  for (unsigned int i = tid; i < nblocks; i += nthreads) acc += static_cast<volatile T*>(partials)[i];
  acc = block_sum(acc, smem);
  if (tid == 0) {
    *out = static_cast<Out>(static_cast<at::opmath_type<Out>>(acc * scale));
    *ticket = 0u;  // the slot is clean for its next user
  }
}

}  // namespace cuda
}  // namespace geokernels
