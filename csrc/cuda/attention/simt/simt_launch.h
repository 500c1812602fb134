// The SIMT kernels' launchers, one instantiation per element type (float, double, __half,
// __nv_bfloat16) in the simt_{fwd,bwd}_*.cu files; simt_api.cu dispatches the dtype.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/attention_params.h"
#include "cuda/attention/attention_launch.h"

namespace longattn::cuda::simt {

template <typename T>
cudaError_t launch_simt_forward(const AttentionParams& p, cudaStream_t stream);

template <typename T>
cudaError_t launch_simt_backward(const AttentionParams& p, const AttentionGrads& g,
                                 cudaStream_t stream);

// The backward's workspace holds delta: lse's shape, in the accumulation type.
inline size_t simt_workspace_bytes(const AttentionParams& p, size_t acc_bytes) {
  return static_cast<size_t>(p.heads_q * p.total_q) * acc_bytes;
}

}  // namespace longattn::cuda::simt
