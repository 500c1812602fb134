// The CUDA RoPE kernels' entry points: plain params in, no torch types, so the kernel
// translation units (rope_kernel.cu, rope_backward_kernel.cu) compile without ATen headers.
#pragma once
#include <cuda_runtime_api.h>

#include "common/rope_params.h"
#include "cuda/kernel_dtype.h"

namespace longattn::cuda {

// Largest rotary_dim the kernel takes: its cos/sin table lives in shared memory.
constexpr int64_t kMaxRotaryDimCuda = 2048;

// Launches on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t launch_rope(const RopeParams& p, KernelDtype dtype, cudaStream_t stream);

// rope_backward (p from make_rope_backward): fp64 workspace elements the launch needs (block
// partials of the inv_freq gradient; depends on the problem only), then the two launches.
int64_t rope_backward_workspace(const RopeParams& p, KernelDtype dtype);
cudaError_t launch_rope_backward(const RopeParams& p, KernelDtype dtype, double* workspace,
                                 cudaStream_t stream);

}  // namespace longattn::cuda
