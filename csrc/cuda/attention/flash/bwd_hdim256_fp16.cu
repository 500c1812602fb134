// Flash attention backward instantiation: fp16, head dim 256 (176 KB of shared memory: sm_90 parts).
#include "cuda/attention/flash/bwd_launch.h"

namespace longattn::cuda::flash {
template cudaError_t run_flash_bwd<DeviceBwdTraits<cutlass::half_t, 256>>(const AttentionParams&, const AttentionGrads&, cudaStream_t);
}  // namespace longattn::cuda::flash
