// SIMT attention forward, double inputs.
#include "cuda/attention/simt/simt_forward.cuh"

namespace longattn::cuda::simt {
template cudaError_t launch_simt_forward<double>(const AttentionParams&, cudaStream_t);
}  // namespace longattn::cuda::simt
