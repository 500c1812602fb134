#include "rope_attention_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace longattn {
namespace {

const std::optional<at::Tensor> kNoTensor;

// Positions of the remaps stay below 2**48 like attention's q_start, so every angle a kernel
// forms (a position plus a window) is far inside rope_math.h's exact range (2**53).
constexpr int64_t kMaxRemapSize = int64_t(1) << 48;

RemapKind parse_remap(std::string_view name) {
  if (name == "none") return RemapKind::kNone;
  if (name == "self_extend") return RemapKind::kSelfExtend;
  if (name == "rerope") return RemapKind::kReRoPE;
  if (name == "lm_infinite") return RemapKind::kLMInfinite;
  TORCH_CHECK_VALUE(false, "remap must be 'none', 'self_extend', 'rerope' or 'lm_infinite', got '",
                    std::string(name), "'");
}

void check_size(int64_t x, int64_t min, const char* name, std::string_view remap) {
  TORCH_CHECK_VALUE(x >= min && x < kMaxRemapSize, name, " must be an int in [", min,
                    ", 2**48) for remap '", std::string(remap), "', got ", x);
}

RemapParams make_remap(const RopeAttentionArgs& a) {
  RemapParams r;
  r.kind = parse_remap(a.remap);
  r.causal = a.causal;
  if (r.kind == RemapKind::kNone) return r;
  TORCH_CHECK_VALUE(a.causal, "remap '", std::string(a.remap),
                    "' is causal attention: causal must be True");
  check_size(a.window, 1, "window", a.remap);
  r.window = a.window;
  if (r.kind == RemapKind::kSelfExtend) {
    check_size(a.group_size, 1, "group_size", a.remap);
    r.group = a.group_size;
  } else if (r.kind == RemapKind::kReRoPE) {
    TORCH_CHECK_VALUE(a.leak == 0.0 || (std::isfinite(a.leak) && a.leak >= 1.0),
                      "leak must be a finite number >= 1 (0: not leaky), got ", a.leak);
    r.leak = a.leak;
  } else {
    check_size(a.global_tokens, 0, "global_tokens", a.remap);
    check_size(a.max_distance, 1, "max_distance", a.remap);
    r.global_tokens = a.global_tokens;
    r.max_distance = a.max_distance;
  }
  return r;
}

RotaryParams make_rotary(const RopeAttentionArgs& a, const RemapParams& remap) {
  const at::Tensor& f = a.inv_freq;
  const int64_t D = a.q.size(-1);
  TORCH_CHECK_VALUE(a.rotary_dim >= 2 && a.rotary_dim % 2 == 0,
                    "rotary_dim must be even and >= 2, got ", a.rotary_dim);
  TORCH_CHECK_VALUE(a.rotary_dim <= D, "rotary_dim = ", a.rotary_dim,
                    " is larger than head_dim = ", D);
  TORCH_CHECK_VALUE(f.dim() == 1 && f.size(0) == a.rotary_dim / 2,
                    "inv_freq must be 1-D of length rotary_dim / 2 = ", a.rotary_dim / 2,
                    ", got shape ", f.sizes());
  TORCH_CHECK_VALUE(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble,
                    "inv_freq must be float32 (or float64), got ", f.scalar_type());
  TORCH_CHECK_VALUE(f.device() == a.q.device(), "inv_freq is on ", f.device(), " but q is on ",
                    a.q.device());
  TORCH_CHECK_VALUE(f.is_contiguous(), "inv_freq must be contiguous");
  TORCH_CHECK_VALUE(std::isfinite(a.attention_scaling), "attention_scaling must be finite, got ",
                    a.attention_scaling);
  RotaryParams r;
  r.inv_freq = f.data_ptr();
  r.inv_freq_fp64 = f.scalar_type() == at::kDouble;
  r.rotary_dim = a.rotary_dim;
  r.interleaved = a.interleaved;
  r.scaling = a.attention_scaling;
  r.leak = remap.leak;
  return r;
}

}  // namespace

AttentionArgs RopeAttentionArgs::attention() const {
  return AttentionArgs{q, k, v, cu_seqlens_q, cu_seqlens_k, kNoTensor, sink_logits, scale,
                       softcap, 0.0, causal, kUnbounded, kUnbounded, 0, q_start, 0,
                       max_seqlen_q, max_seqlen_k};
}

RopeAttentionParams make_rope_attention_params(const RopeAttentionArgs& a) {
  RopeAttentionParams p;
  p.attn = make_attention_params(a.attention());
  TORCH_CHECK_VALUE(a.inv_freq.defined(), "inv_freq must be a tensor");
  p.remap = make_remap(a);
  p.rot = make_rotary(a, p.remap);
  // The union of the visible pairs is the mask every tile walk uses (common/remap.h).
  const MaskParams all = p.remap.union_mask();
  p.attn.mask.causal = all.causal;
  p.attn.mask.left = all.left;
  p.attn.mask.right = all.right;
  p.attn.mask.sinks = all.sinks;
  return p;
}

}  // namespace longattn
