// The Hopper forward for fp16 at head dim 128.
#include "cuda/attention/sm90/fwd_launch.h"

namespace longattn::cuda::sm90 {
template cudaError_t sm90_fwd<Sm90Dtype::kFp16, 128>(const AttentionParams&, cudaStream_t);
}  // namespace longattn::cuda::sm90
