// The SIMT rope_attention launchers (instantiated per element type in remap_*.cu): the forward;
// the backward as the SIMT attention backward's sequence (delta, the sink-logit gradient, then
// the dK/dV and dQ passes, in stream order).
#pragma once
#include "cuda/attention/remap/remap_backward_kernels.cuh"
#include "cuda/attention/remap/remap_forward_kernel.cuh"
#include "cuda/attention/remap/remap_launch.h"
#include "cuda/attention/simt/simt_backward_kernels.cuh"
#include "cuda/attention/simt/simt_launch.h"
#include "cuda/attention/simt/simt_launch_util.cuh"

namespace longattn::cuda::remap {

template <typename T>
cudaError_t launch_forward(const RopeAttentionParams& p, cudaStream_t stream) {
  size_t optin = 0;
  const cudaError_t err = simt::smem_optin_limit(&optin);
  if (err != cudaSuccess) return err;
  return simt::launch_planned(remap_forward_kernel<T>, forward_launch(p, sizeof(acc_t<T>), optin),
                              stream, p);
}

template <typename T>
cudaError_t launch_backward(const RopeAttentionParams& p, const AttentionGrads& g,
                            cudaStream_t stream) {
  using A = acc_t<T>;
  const AttentionParams& a = p.attn;
  if (g.workspace_bytes < simt::simt_workspace_bytes(a, sizeof(A))) return cudaErrorInvalidValue;
  size_t optin = 0;
  cudaError_t err = simt::smem_optin_limit(&optin);
  if (err != cudaSuccess) return err;
  const int64_t rows = a.total_q * a.heads_q;
  if (rows > 0) {
    err = launch_kernel(simt::simt_delta_kernel<T>, static_cast<unsigned>(ceil_div(rows, kWarps)),
                        kThreads, 0, stream, a, g);
    if (err != cudaSuccess) return err;
  }
  if (g.dsink != nullptr && a.heads_q > 0) {  // written even without rows (0 then)
    err = launch_kernel(simt::simt_dsink_kernel<T>, static_cast<unsigned>(a.heads_q), kThreads, 0,
                        stream, a, g);
    if (err != cudaSuccess) return err;
  }
  err = simt::launch_planned(remap_dkdv_kernel<T>, dkdv_launch(p, sizeof(A), optin), stream, p, g);
  if (err != cudaSuccess) return err;
  return simt::launch_planned(remap_dq_kernel<T>, dq_launch(p, sizeof(A), optin), stream, p, g);
}

}  // namespace longattn::cuda::remap
