// The parameters of one attention call, as both backends receive them: raw pointers and
// element strides, so kernels never see torch types. Dense and variable-length batches share
// the struct: in varlen form cu_seqlens_* give each sequence's first token and batch strides
// are unused.
#pragma once
#include <cstdint>

#include "common/mask.h"
#include "common/scores.h"

namespace longattn {

struct AttentionParams {
  // Inputs (element type given by the dispatch) and strides in elements. Head dim stride is 1.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;

  // Output, contiguous (B, Lq, Hq, D) or (Tq, Hq, D); lse (B, Hq, Lq) or (Hq, Tq), fp32
  // (fp64 for fp64 inputs, so float64 gradcheck of lse is meaningful).
  void* out = nullptr;
  void* lse = nullptr;

  int64_t batch = 0;       // number of sequences
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;  // dense lengths, or the max over sequences in varlen
  int64_t total_q = 0;                 // varlen: tokens in q (lse row stride)

  const int32_t* cu_seqlens_q = nullptr;  // varlen when non-null (host pointers on CPU)
  const int32_t* cu_seqlens_k = nullptr;

  const float* alibi_slopes = nullptr;  // [heads_q] or null
  const void* sink_logits = nullptr;    // [heads_q] fp32 (fp64 allowed with fp64 inputs) or null
  bool sink_logits_fp64 = false;

  MaskParams mask;               // q_start is filled per sequence when q_start_default
  bool q_start_default = true;   // q_start = k_start + Lk - Lq of each sequence
  ScoreParams score;

  LONGATTN_HD bool varlen() const { return cu_seqlens_q != nullptr; }
  LONGATTN_HD int64_t group() const { return heads_q / heads_kv; }
  LONGATTN_HD double sink_logit(int64_t h) const {
    return sink_logits_fp64 ? static_cast<const double*>(sink_logits)[h]
                            : static_cast<const float*>(sink_logits)[h];
  }
};

// Per-sequence view: where sequence b's rows start, its lengths and its mask positions.
struct SeqInfo {
  int64_t q_len, k_len;
  int64_t q_token0, k_token0;  // first token of the sequence (the batch index in dense form)
  MaskParams mask;
};

LONGATTN_HD SeqInfo seq_info(const AttentionParams& p, int64_t b) {
  SeqInfo s;
  if (p.varlen()) {
    s.q_token0 = p.cu_seqlens_q[b];
    s.k_token0 = p.cu_seqlens_k[b];
    s.q_len = p.cu_seqlens_q[b + 1] - s.q_token0;
    s.k_len = p.cu_seqlens_k[b + 1] - s.k_token0;
  } else {
    s.q_token0 = 0;
    s.k_token0 = 0;
    s.q_len = p.seqlen_q;
    s.k_len = p.seqlen_k;
  }
  s.mask = p.mask;
  if (p.q_start_default) s.mask.q_start = s.mask.k_start + s.k_len - s.q_len;
  return s;
}

// Element offsets of (sequence b, row 0, head h) in q/k/v/out, and of lse row 0.
LONGATTN_HD int64_t q_offset(const AttentionParams& p, const SeqInfo& s, int64_t b, int64_t h) {
  return (p.varlen() ? s.q_token0 * p.q_row_stride : b * p.q_batch_stride) + h * p.q_head_stride;
}
LONGATTN_HD int64_t k_offset(const AttentionParams& p, const SeqInfo& s, int64_t b, int64_t h) {
  return (p.varlen() ? s.k_token0 * p.k_row_stride : b * p.k_batch_stride) + h * p.k_head_stride;
}
LONGATTN_HD int64_t v_offset(const AttentionParams& p, const SeqInfo& s, int64_t b, int64_t h) {
  return (p.varlen() ? s.k_token0 * p.v_row_stride : b * p.v_batch_stride) + h * p.v_head_stride;
}
// out (and dq, dout) are contiguous: row stride heads_q * head_dim.
LONGATTN_HD int64_t out_offset(const AttentionParams& p, const SeqInfo& s, int64_t b, int64_t h) {
  const int64_t row = p.heads_q * p.head_dim;
  return (p.varlen() ? s.q_token0 : b * p.seqlen_q) * row + h * p.head_dim;
}
LONGATTN_HD int64_t lse_offset(const AttentionParams& p, const SeqInfo& s, int64_t b, int64_t h) {
  return p.varlen() ? h * p.total_q + s.q_token0 : (b * p.heads_q + h) * p.seqlen_q;
}

}  // namespace longattn
