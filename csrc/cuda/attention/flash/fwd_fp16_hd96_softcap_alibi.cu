// Tensor-core attention forward: fp16, head dim 96, logits with softcap and/or ALiBi.
#include "cuda/attention/flash/fwd_instances.h"
#include "cuda/attention/flash/fwd_launch.h"

namespace longattn::cuda::flash {

cudaError_t flash_fwd_fp16_hd96_softcap_alibi(const AttentionParams& p, cudaStream_t stream) {
  return launch_flash_fwd<DeviceFwdTraits<cute::half_t, 96>, false>(p, stream);
}

}  // namespace longattn::cuda::flash
