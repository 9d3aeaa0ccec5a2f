// Dynamic shared memory beyond the default 48 KiB per block, checked against the device.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <mutex>

namespace geokernels {
namespace cuda {

// The most dynamic shared memory (bytes) one block of `kernel` can get on the current device:
// the device's opt-in limit (99 KiB on sm_86/89, 163 KiB on A100, 227 KiB on H100/H200) less
// the kernel's static shared memory.
template <class Kernel>
size_t max_dynamic_smem(Kernel* kernel) {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t limit = static_cast<size_t>(optin);
  return limit > attr.sharedSizeBytes ? limit - attr.sharedSizeBytes : 0;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device, or raises a
// ValueError "<what> needs N bytes of shared memory per block, this GPU allows M; <hint>".
// The kernel's limit is only ever raised (under a lock), so two host threads that need
// different sizes cannot lower it under each other's launch.
template <class Kernel>
void allow_dynamic_smem(Kernel* kernel, size_t bytes, const char* what, const char* hint) {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (bytes <= static_cast<size_t>(attr.maxDynamicSharedSizeBytes)) return;
  const size_t most = max_dynamic_smem(kernel);
  TORCH_CHECK_VALUE(bytes <= most, what, " needs ", bytes, " bytes of shared memory per block, this GPU "
                    "allows ", most, "; ", hint);
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (bytes > static_cast<size_t>(attr.maxDynamicSharedSizeBytes)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

}  // namespace cuda
}  // namespace geokernels
