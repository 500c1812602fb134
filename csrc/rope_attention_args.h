// Argument checking of rope_attention / rope_attention_backward shared by every backend:
// attention's checks (attention_args.h) for q, k, v, cu_seqlens, sink_logits, scale and
// softcap, then the remap's and the rotary part's, each error naming its argument.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "attention_args.h"
#include "common/rope_attention_params.h"

namespace longattn {

struct RopeAttentionArgs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor& inv_freq;
  const std::optional<at::Tensor>& cu_seqlens_q;
  const std::optional<at::Tensor>& cu_seqlens_k;
  const std::optional<at::Tensor>& sink_logits;
  std::string_view remap;
  int64_t window, group_size;
  double leak;
  int64_t global_tokens, max_distance;
  double attention_scaling;
  int64_t rotary_dim;
  bool interleaved;
  double scale, softcap;
  bool causal;
  std::optional<int64_t> q_start;
  std::optional<int64_t> max_seqlen_q, max_seqlen_k;

  // The same call as attention's arguments: the remap's union mask, no ALiBi, no log-n, keys
  // from position 0.
  AttentionArgs attention() const;
};

// The C++ signatures of the two ops (schemas in ops.cpp), calling
//   forward:  Impl(const RopeAttentionArgs&)
//   backward: Impl(const RopeAttentionArgs&, dout, dlse, out, lse)
#define LONGATTN_ROPE_ATTENTION_PARAMS                                                         \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &inv_freq,   \
      const std::optional<at::Tensor>&cu_seqlens_q,                                            \
      const std::optional<at::Tensor>&cu_seqlens_k,                                            \
      const std::optional<at::Tensor>&sink_logits, c10::string_view remap, int64_t window,     \
      int64_t group_size, double leak, int64_t global_tokens, int64_t max_distance,            \
      double attention_scaling, int64_t rotary_dim, bool interleaved, double scale,            \
      double softcap, bool causal, std::optional<int64_t> q_start,                             \
      std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k
#define LONGATTN_ROPE_ATTENTION_ARGS                                                           \
  RopeAttentionArgs {                                                                          \
    q, k, v, inv_freq, cu_seqlens_q, cu_seqlens_k, sink_logits,                                \
        std::string_view(remap.data(), remap.size()), window, group_size, leak, global_tokens, \
        max_distance, attention_scaling, rotary_dim, interleaved, scale, softcap, causal,      \
        q_start, max_seqlen_q, max_seqlen_k                                                    \
  }

template <auto Impl>
std::tuple<at::Tensor, at::Tensor> rope_attention_op(LONGATTN_ROPE_ATTENTION_PARAMS) {
  return Impl(LONGATTN_ROPE_ATTENTION_ARGS);
}

template <auto Impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rope_attention_backward_op(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& out,
    const at::Tensor& lse, LONGATTN_ROPE_ATTENTION_PARAMS) {
  return Impl(LONGATTN_ROPE_ATTENTION_ARGS, dout, dlse, out, lse);
}

#undef LONGATTN_ROPE_ATTENTION_PARAMS
#undef LONGATTN_ROPE_ATTENTION_ARGS

// Checks everything and returns the params with input pointers and shapes set (outputs
// null). inv_freq is read by the kernels on its own device.
RopeAttentionParams make_rope_attention_params(const RopeAttentionArgs& a);

}  // namespace longattn
