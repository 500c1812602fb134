// The SIMT forward's launcher (instantiated per element type in simt_fwd_*.cu).
#pragma once
#include "cuda/attention/simt/simt_forward_kernel.cuh"
#include "cuda/attention/simt/simt_launch.h"
#include "cuda/attention/simt/simt_launch_util.cuh"

namespace longattn::cuda::simt {

template <typename T>
cudaError_t launch_simt_forward(const AttentionParams& p, cudaStream_t stream) {
  size_t optin = 0;
  const cudaError_t err = smem_optin_limit(&optin);
  if (err != cudaSuccess) return err;
  const SimtLaunch l = query_major_launch<ForwardSmem>(p, sizeof(acc_t<T>), optin);
  return launch_planned(simt_forward_kernel<T>, l, stream, p);
}

}  // namespace longattn::cuda::simt
