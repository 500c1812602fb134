// Argument checking shared by every backend: turns the op's tensors and scalars into
// AttentionParams, raising errors that name the offending argument. Backends then only fill
// in device pointers they own (outputs) and launch.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/attention_params.h"

namespace longattn {

struct AttentionArgs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const std::optional<at::Tensor>& cu_seqlens_q;
  const std::optional<at::Tensor>& cu_seqlens_k;
  const std::optional<at::Tensor>& alibi_slopes;
  const std::optional<at::Tensor>& sink_logits;
  double scale, softcap, logn_base;
  bool causal;
  int64_t window_left, window_right, sinks;
  std::optional<int64_t> q_start;
  int64_t k_start;
  // Upper bounds of the longest q / k sequence (None: derived; see make_attention_params).
  std::optional<int64_t> max_seqlen_q, max_seqlen_k;
};

// The C++ signatures of the attention and attention_backward ops (schemas in ops.cpp), which
// every backend's m.impl must have exactly. attention_op<Impl> and attention_backward_op<Impl>
// have them, so the arguments are spelled out once, and call Impl with those shared by both ops
// gathered into AttentionArgs:
//   forward:  Impl(const AttentionArgs&)
//   backward: Impl(const AttentionArgs&, dout, dlse, out, lse)
template <auto Impl>
std::tuple<at::Tensor, at::Tensor> attention_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sink_logits,
    double scale, double softcap, double logn_base, bool causal, int64_t window_left,
    int64_t window_right, int64_t sinks, std::optional<int64_t> q_start, int64_t k_start,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k) {
  return Impl(AttentionArgs{q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sink_logits, scale,
                            softcap, logn_base, causal, window_left, window_right, sinks, q_start,
                            k_start, max_seqlen_q, max_seqlen_k});
}

template <auto Impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_op(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sink_logits,
    double scale, double softcap, double logn_base, bool causal, int64_t window_left,
    int64_t window_right, int64_t sinks, std::optional<int64_t> q_start, int64_t k_start,
    std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k) {
  return Impl(AttentionArgs{q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sink_logits, scale,
                            softcap, logn_base, causal, window_left, window_right, sinks, q_start,
                            k_start, max_seqlen_q, max_seqlen_k},
              dout, dlse, out, lse);
}

constexpr int64_t kMaxHeadDim = 256;

// Checks everything and returns params with input pointers and shapes set (out/lse null).
// cu_seqlens pointers are those of the given tensors (host on CPU, device on CUDA); the
// monotonicity check reads them, so on CUDA the caller passes host copies for the check.
AttentionParams make_attention_params(const AttentionArgs& a);

// Output shapes: out like q (contiguous), lse (B, Hq, Lq) or (Hq, Tq).
std::vector<int64_t> lse_shape(const AttentionArgs& a);

// lse (and the backward's row statistics) are fp32, fp64 for fp64 inputs so that float64
// gradcheck sees an exact lse.
at::ScalarType lse_dtype(const at::Tensor& q);

// Check a gradient-side tensor (dout, out) has q's shape, dtype and device.
void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name);

// The forward's outputs on q's device, with p->out / p->lse pointed at them: out like q
// (contiguous), lse of lse_shape in lse_dtype.
struct ForwardTensors {
  at::Tensor out, lse;
};
ForwardTensors make_forward_tensors(const AttentionArgs& a, AttentionParams* p);

// The backward's inputs checked (dout and out like q, lse of lse_shape / lse_dtype, dlse of
// lse's shape, all on q's device) and made contiguous, dlse in lse_dtype (undefined when not
// given), with p->out / p->lse pointed at them; and its outputs: dq like q, dk / dv like k / v
// (contiguous, uninitialized), dsink [heads_q] in sink_logits' dtype (empty fp32 without).
struct BackwardTensors {
  at::Tensor dout, out, lse, dlse;
  at::Tensor dq, dk, dv, dsink;
  const void* dlse_ptr() const { return dlse.defined() ? dlse.data_ptr() : nullptr; }
  void* dsink_ptr(const AttentionArgs& a) const {
    return a.sink_logits.has_value() ? dsink.data_ptr() : nullptr;
  }
};
BackwardTensors prepare_backward(const AttentionArgs& a, AttentionParams* p, const at::Tensor& dout,
                                 const at::Tensor& out, const at::Tensor& lse,
                                 const std::optional<at::Tensor>& dlse);

}  // namespace longattn
