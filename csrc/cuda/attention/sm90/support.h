// What the Hopper forward covers, as a reason it cannot take a call (empty when it can), from the
// call's parameters alone; the device and the tensors' addresses are checked by the registration
// (attention_register.cpp). Host code without CuTe, so the registration and the host checks use
// it as it is.
#pragma once
#include <cstdint>
#include <string>

#include "common/attention_params.h"
#include "cuda/kernel_dtype.h"

namespace longattn::cuda {

constexpr int kSm90HeadDims[] = {64, 128};

inline std::string sm90_unsupported(const AttentionParams& p, KernelDtype dtype) {
  if (dtype != KernelDtype::kFloat16 && dtype != KernelDtype::kBFloat16) {
    return "the sm90 forward takes float16/bfloat16 inputs";
  }
  bool dim_ok = false;
  std::string dims;
  for (int d : kSm90HeadDims) {
    dim_ok = dim_ok || d == p.head_dim;
    dims += (dims.empty() ? "" : ", ") + std::to_string(d);
  }
  if (!dim_ok) {
    return "the sm90 forward takes head_dim in {" + dims + "}, got " + std::to_string(p.head_dim);
  }
  // The TMA descriptors describe one dense (B, L, H, D) tensor each.
  if (p.varlen()) return "the sm90 forward takes dense inputs, not variable-length (cu_seqlens) batches";
  if (!p.score.plain()) return "the sm90 forward has no softcap or ALiBi logits";
  // Grid limits (heads on grid y) and 32-bit key indices and TMA coordinates.
  if (p.heads_q > 65535 || p.seqlen_q > (int64_t(1) << 30) || p.seqlen_k > (int64_t(1) << 30) ||
      p.batch > (int64_t(1) << 30)) {
    return "the sm90 forward takes at most 65535 q heads, 2^30 tokens per sequence and 2^30 sequences";
  }
  return {};
}

}  // namespace longattn::cuda
