// SIMT rope_attention forward and backward, bfloat16 inputs.
#include "cuda/attention/remap/remap_kernels.cuh"

namespace longattn::cuda::remap {
template cudaError_t launch_forward<__nv_bfloat16>(const RopeAttentionParams&, cudaStream_t);
template cudaError_t launch_backward<__nv_bfloat16>(const RopeAttentionParams&, const AttentionGrads&,
                                         cudaStream_t);
}  // namespace longattn::cuda::remap
