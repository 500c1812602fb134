// SIMT attention forward, __half inputs.
#include "cuda/attention/simt/simt_forward.cuh"

namespace longattn::cuda::simt {
template cudaError_t launch_simt_forward<__half>(const AttentionParams&, cudaStream_t);
}  // namespace longattn::cuda::simt
