// CPU kernels of rope_attention (RoPE inside attention, with a position remap): entry points
// the op layer calls after it has checked the tensors and filled RopeAttentionParams. The
// attention part is attention's (cpu/attention_kernels.h: tiles, buffers, determinism).
#pragma once
#include "common/rope_attention_params.h"
#include "cpu/attention_kernels.h"

namespace longattn::cpu {

template <typename T>
void rope_attention_forward(const RopeAttentionParams& p);

// g as attention_backward's; dq, dk are the gradients of q and k before RoPE.
template <typename T>
void rope_attention_backward(const RopeAttentionParams& p, const BackwardBuffers& g);

}  // namespace longattn::cpu
