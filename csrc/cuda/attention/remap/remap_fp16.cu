// SIMT rope_attention forward and backward, half inputs.
#include "cuda/attention/remap/remap_kernels.cuh"

namespace longattn::cuda::remap {
template cudaError_t launch_forward<__half>(const RopeAttentionParams&, cudaStream_t);
template cudaError_t launch_backward<__half>(const RopeAttentionParams&, const AttentionGrads&,
                                         cudaStream_t);
}  // namespace longattn::cuda::remap
