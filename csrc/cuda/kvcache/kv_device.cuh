// Device helpers of the KV-cache kernels on top of cuda/device_common.cuh: exp/log of the
// accumulation type, per-head lengths. No ATen here.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/kvcache/kvcache_launch.h"

namespace longattn::cuda::kv_device {

__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float acc_log(float x) { return __logf(x); }
__device__ __forceinline__ double acc_log(double x) { return ::log(x); }

__device__ __forceinline__ int64_t length_at(const KvLengths& l, int64_t b, int64_t h) {
  const int64_t off = b * l.stride_b + h * l.stride_h;
  return l.int64 ? static_cast<const int64_t*>(l.data)[off]
                 : static_cast<int64_t>(static_cast<const int32_t*>(l.data)[off]);
}

}  // namespace longattn::cuda::kv_device
