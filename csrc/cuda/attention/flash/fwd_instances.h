// The tensor-core forward's instantiations, one translation unit each, declared without CuTe
// so the dispatcher compiles fast: fwd_<dtype>_hd<D>.cu for plain logits
// (ScoreParams::plain()), fwd_<dtype>_hd<D>_softcap_alibi.cu for the others.
#pragma once
#include <cuda_runtime_api.h>

#include "common/attention_params.h"

namespace longattn::cuda::flash {

cudaError_t flash_fwd_fp16_hd64(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_fp16_hd128(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_bf16_hd64(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_bf16_hd128(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_fp16_hd64_softcap_alibi(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_fp16_hd128_softcap_alibi(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_bf16_hd64_softcap_alibi(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_bf16_hd128_softcap_alibi(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_fp16_hd96(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_fp16_hd96_softcap_alibi(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_bf16_hd96(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_bf16_hd96_softcap_alibi(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_fp16_hd256(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_fp16_hd256_softcap_alibi(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_bf16_hd256(const AttentionParams& p, cudaStream_t stream);
cudaError_t flash_fwd_bf16_hd256_softcap_alibi(const AttentionParams& p, cudaStream_t stream);

}  // namespace longattn::cuda::flash
