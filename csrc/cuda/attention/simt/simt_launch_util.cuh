// Launch plumbing shared by the SIMT launchers.
#pragma once
#include <cuda_runtime.h>

#include "cuda/attention/simt/simt_tiles.h"
#include "cuda/device_common.cuh"

namespace longattn::cuda::simt {

// Shared memory a CTA may opt into on the current device.
inline cudaError_t smem_optin_limit(size_t* bytes) {
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  }
  *bytes = static_cast<size_t>(optin);
  return err;
}

// kernel<<<l.blocks, kThreads, l.tiles.smem_bytes>>>(args..., l.tiles), through launch_kernel
// (cuda/device_common.cuh).
template <typename... Params, typename... Args>
cudaError_t launch_planned(void (*kernel)(Params...), const SimtLaunch& l, cudaStream_t stream,
                           const Args&... args) {
  if (!l.ok()) return cudaErrorInvalidConfiguration;
  if (l.blocks == 0) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.tiles.smem_bytes));
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, dim3(static_cast<unsigned>(l.blocks)), dim3(kThreads),
                       l.tiles.smem_bytes, stream, args..., l.tiles);
}

}  // namespace longattn::cuda::simt
