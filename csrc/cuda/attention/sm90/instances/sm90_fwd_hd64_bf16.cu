// The Hopper forward for bf16 at head dim 64.
#include "cuda/attention/sm90/fwd_launch.h"

namespace longattn::cuda::sm90 {
template cudaError_t sm90_fwd<Sm90Dtype::kBf16, 64>(const AttentionParams&, cudaStream_t);
}  // namespace longattn::cuda::sm90
