// SIMT attention forward, float inputs.
#include "cuda/attention/simt/simt_forward.cuh"

namespace longattn::cuda::simt {
template cudaError_t launch_simt_forward<float>(const AttentionParams&, cudaStream_t);
}  // namespace longattn::cuda::simt
