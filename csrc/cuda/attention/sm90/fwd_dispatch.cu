// sm90_forward (cuda/attention/attention_launch.h): picks the instantiation for the dtype and
// head dim. The caller (attention_register.cpp) comes here only when sm90_unsupported and its
// device and tensor checks found nothing.
#include "cuda/attention/attention_launch.h"
#include "cuda/attention/sm90/instances.h"
#include "cuda/attention/sm90/support.h"

namespace longattn::cuda {
namespace {

template <sm90::Sm90Dtype kDtype>
cudaError_t forward_for(const AttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return sm90::sm90_fwd<kDtype, 64>(p, stream);
    case 128: return sm90::sm90_fwd<kDtype, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t sm90_forward(const AttentionParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (!sm90_unsupported(p, dtype).empty()) return cudaErrorInvalidValue;
  return dtype == KernelDtype::kBFloat16 ? forward_for<sm90::Sm90Dtype::kBf16>(p, stream)
                                         : forward_for<sm90::Sm90Dtype::kFp16>(p, stream);
}

}  // namespace longattn::cuda
