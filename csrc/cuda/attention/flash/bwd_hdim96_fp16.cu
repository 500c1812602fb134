// Flash attention backward instantiation: fp16, head dim 96 (116 KB of shared memory: A100, H100, H200).
#include "cuda/attention/flash/bwd_launch.h"

namespace longattn::cuda::flash {
template cudaError_t run_flash_bwd<DeviceBwdTraits<cutlass::half_t, 96>>(const AttentionParams&, const AttentionGrads&, cudaStream_t);
}  // namespace longattn::cuda::flash
