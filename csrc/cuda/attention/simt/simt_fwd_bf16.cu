// SIMT attention forward, __nv_bfloat16 inputs.
#include "cuda/attention/simt/simt_forward.cuh"

namespace longattn::cuda::simt {
template cudaError_t launch_simt_forward<__nv_bfloat16>(const AttentionParams&, cudaStream_t);
}  // namespace longattn::cuda::simt
