// SIMT rope_attention forward and backward, double inputs.
#include "cuda/attention/remap/remap_kernels.cuh"

namespace longattn::cuda::remap {
template cudaError_t launch_forward<double>(const RopeAttentionParams&, cudaStream_t);
template cudaError_t launch_backward<double>(const RopeAttentionParams&, const AttentionGrads&,
                                         cudaStream_t);
}  // namespace longattn::cuda::remap
