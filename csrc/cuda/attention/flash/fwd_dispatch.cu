// flash_forward (cuda/attention/attention_launch.h): picks the instantiation for the dtype,
// head dim and logit kind. The caller (attention_register.cpp) only comes here for fp16/bf16,
// head dims in kFlashHeadDims, 16-byte aligned q/k/v, strides in multiples of 8 elements and
// SM80+.
#include "cuda/attention/attention_launch.h"
#include "cuda/attention/flash/fwd_instances.h"

namespace longattn::cuda {

cudaError_t flash_forward(const AttentionParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (!flash_supported(dtype, p.head_dim)) return cudaErrorInvalidValue;
  const bool bf16 = dtype == KernelDtype::kBFloat16;
  const bool plain = p.score.plain();
  using Fn = cudaError_t (*)(const AttentionParams&, cudaStream_t);
  Fn fn = nullptr;
  if (p.head_dim == 64) {
    fn = bf16 ? (plain ? flash::flash_fwd_bf16_hd64 : flash::flash_fwd_bf16_hd64_softcap_alibi)
              : (plain ? flash::flash_fwd_fp16_hd64 : flash::flash_fwd_fp16_hd64_softcap_alibi);
  } else if (p.head_dim == 96) {
    fn = bf16 ? (plain ? flash::flash_fwd_bf16_hd96 : flash::flash_fwd_bf16_hd96_softcap_alibi)
              : (plain ? flash::flash_fwd_fp16_hd96 : flash::flash_fwd_fp16_hd96_softcap_alibi);
  } else if (p.head_dim == 128) {
    fn = bf16 ? (plain ? flash::flash_fwd_bf16_hd128 : flash::flash_fwd_bf16_hd128_softcap_alibi)
              : (plain ? flash::flash_fwd_fp16_hd128 : flash::flash_fwd_fp16_hd128_softcap_alibi);
  } else if (p.head_dim == 256) {
    fn = bf16 ? (plain ? flash::flash_fwd_bf16_hd256 : flash::flash_fwd_bf16_hd256_softcap_alibi)
              : (plain ? flash::flash_fwd_fp16_hd256 : flash::flash_fwd_fp16_hd256_softcap_alibi);
  }
  return fn != nullptr ? fn(p, stream) : cudaErrorInvalidValue;
}

}  // namespace longattn::cuda
