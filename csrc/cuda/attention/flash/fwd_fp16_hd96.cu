// Tensor-core attention forward: fp16, head dim 96, plain logits (scale only).
#include "cuda/attention/flash/fwd_instances.h"
#include "cuda/attention/flash/fwd_launch.h"

namespace longattn::cuda::flash {

cudaError_t flash_fwd_fp16_hd96(const AttentionParams& p, cudaStream_t stream) {
  return launch_flash_fwd<DeviceFwdTraits<cute::half_t, 96>, true>(p, stream);
}

}  // namespace longattn::cuda::flash
