// SIMT attention backward, __nv_bfloat16 inputs.
#include "cuda/attention/simt/simt_backward.cuh"

namespace longattn::cuda::simt {
template cudaError_t launch_simt_backward<__nv_bfloat16>(const AttentionParams&, const AttentionGrads&,
                                              cudaStream_t);
}  // namespace longattn::cuda::simt
