// The CUDA RoPE kernel's entry point: plain params in, no torch types, so the kernel
// translation unit (rope_kernel.cu) compiles without ATen headers.
#pragma once
#include <cuda_runtime_api.h>

#include "common/rope_params.h"
#include "cuda/kernel_dtype.h"

namespace longattn::cuda {

// Largest rotary_dim the kernel takes: its cos/sin table lives in shared memory.
constexpr int64_t kMaxRotaryDimCuda = 2048;

// Launches on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t launch_rope(const RopeParams& p, KernelDtype dtype, cudaStream_t stream);

}  // namespace longattn::cuda
