// The SIMT backward's launcher (instantiated per element type in simt_bwd_*.cu): delta, then
// the sink-logit gradient, then the dK/dV and dQ passes, in stream order.
#pragma once
#include "cuda/attention/simt/simt_backward_kernels.cuh"
#include "cuda/attention/simt/simt_launch.h"
#include "cuda/attention/simt/simt_launch_util.cuh"

namespace longattn::cuda::simt {

template <typename T>
cudaError_t launch_simt_backward(const AttentionParams& p, const AttentionGrads& g,
                                 cudaStream_t stream) {
  using A = acc_t<T>;
  if (g.workspace_bytes < simt_workspace_bytes(p, sizeof(A))) return cudaErrorInvalidValue;
  size_t optin = 0;
  cudaError_t err = smem_optin_limit(&optin);
  if (err != cudaSuccess) return err;

  const int64_t rows = p.total_q * p.heads_q;
  if (rows > 0) {
    err = launch_kernel(simt_delta_kernel<T>, static_cast<unsigned>(ceil_div(rows, kWarps)),
                        kThreads, 0, stream, p, g);
    if (err != cudaSuccess) return err;
  }
  if (g.dsink != nullptr && p.heads_q > 0) {  // written even without rows (0 then)
    err = launch_kernel(simt_dsink_kernel<T>, static_cast<unsigned>(p.heads_q), kThreads, 0,
                        stream, p, g);
    if (err != cudaSuccess) return err;
  }
  err = launch_planned(simt_dkdv_kernel<T>, key_major_launch(p, sizeof(A), optin), stream, p, g);
  if (err != cudaSuccess) return err;
  return launch_planned(simt_dq_kernel<T>, query_major_launch<DqSmem>(p, sizeof(A), optin), stream,
                        p, g);
}

}  // namespace longattn::cuda::simt
