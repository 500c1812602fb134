// The SIMT rope_attention kernels' entry points: RopeAttentionParams (common/
// rope_attention_params.h, the struct the CPU kernels take) plus plain device pointers, no
// torch types. rope_attention_register.cpp checks the tensors, allocates the outputs and the
// zeroed workspace and calls these; the remap, its tiles and sides come from common/remap.h.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/rope_attention_params.h"
#include "cuda/attention/attention_launch.h"
#include "cuda/kernel_dtype.h"

namespace longattn::cuda {

// Forward: p.attn.out (contiguous, q's dtype) and p.attn.lse are written.
cudaError_t remap_forward(const RopeAttentionParams& p, KernelDtype dtype, cudaStream_t stream);

// Backward: g as the attention backward's (attention_launch.h); dq, dk are the gradients of q
// and k before RoPE. Zeroed workspace needed, in bytes. Deterministic (no atomics).
size_t remap_backward_workspace(const RopeAttentionParams& p, KernelDtype dtype);
cudaError_t remap_backward(const RopeAttentionParams& p, const AttentionGrads& g, KernelDtype dtype,
                           cudaStream_t stream);

namespace remap {

template <typename T>
cudaError_t launch_forward(const RopeAttentionParams& p, cudaStream_t stream);

template <typename T>
cudaError_t launch_backward(const RopeAttentionParams& p, const AttentionGrads& g,
                            cudaStream_t stream);

}  // namespace remap
}  // namespace longattn::cuda
