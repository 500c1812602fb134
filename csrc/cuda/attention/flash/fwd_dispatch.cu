// flash_forward (cuda/attention/attention_launch.h): picks the instantiation for the dtype,
// head dim and logit kind. The caller (attention_register.cpp) only comes here for fp16/bf16,
// head dims in kFlashHeadDims, 16-byte aligned q/k/v, strides in multiples of 8 elements and
// SM80+.
#include "cuda/attention/attention_launch.h"
#include "cuda/attention/flash/instances.h"

namespace longattn::cuda {
namespace {

using flash::FlashDtype;

template <FlashDtype kDtype>
cudaError_t forward_for(const AttentionParams& p, cudaStream_t stream) {
  const bool plain = p.score.plain();
  switch (p.head_dim) {
    case 64: return plain ? flash::flash_fwd<kDtype, 64, true>(p, stream) : flash::flash_fwd<kDtype, 64, false>(p, stream);
    case 96: return plain ? flash::flash_fwd<kDtype, 96, true>(p, stream) : flash::flash_fwd<kDtype, 96, false>(p, stream);
    case 128: return plain ? flash::flash_fwd<kDtype, 128, true>(p, stream) : flash::flash_fwd<kDtype, 128, false>(p, stream);
    case 256: return plain ? flash::flash_fwd<kDtype, 256, true>(p, stream) : flash::flash_fwd<kDtype, 256, false>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t flash_forward(const AttentionParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (!flash_supported(dtype, p.head_dim)) return cudaErrorInvalidValue;
  return dtype == KernelDtype::kBFloat16 ? forward_for<FlashDtype::kBf16>(p, stream)
                                         : forward_for<FlashDtype::kFp16>(p, stream);
}

}  // namespace longattn::cuda
