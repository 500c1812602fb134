// SIMT rope_attention forward and backward, float inputs.
#include "cuda/attention/remap/remap_kernels.cuh"

namespace longattn::cuda::remap {
template cudaError_t launch_forward<float>(const RopeAttentionParams&, cudaStream_t);
template cudaError_t launch_backward<float>(const RopeAttentionParams&, const AttentionGrads&,
                                         cudaStream_t);
}  // namespace longattn::cuda::remap
