// What every flash backward kernel receives (one struct, passed by value as a kernel
// parameter), and where its scratch lives inside the caller's zeroed workspace.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/attention_params.h"

namespace longattn::cuda::flash {

struct BwdParams {
  AttentionParams p;
  const void* dout = nullptr;  // like out
  const void* dlse = nullptr;  // like lse (fp32), or null
  void* dq = nullptr;          // like out
  void* dk = nullptr;          // (rows_k, heads_kv, head_dim) contiguous
  void* dv = nullptr;
  void* dsink = nullptr;       // [heads_q] in the sink logits' dtype, or null
  float* delta = nullptr;      // workspace, lse's layout: rowsum(dO * O) - dlse, 0 on empty rows
  float* dq_accum = nullptr;   // workspace, out's layout, fp32; null in deterministic mode
  float scale = 1.f;           // softmax scale (the logn factor is per row, on top)
  float softcap = 0.f, inv_softcap = 0.f;
  int64_t rows_q = 0;          // rows of q / out / dq (sum over sequences)
};

// Workspace layout: delta, then (unless deterministic) the fp32 dQ accumulator.
struct BwdWorkspace {
  size_t delta_bytes = 0, dq_accum_offset = 0, dq_accum_bytes = 0, total = 0;
};

inline size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

inline int64_t q_rows(const AttentionParams& p) { return p.varlen() ? p.total_q : p.batch * p.seqlen_q; }

inline BwdWorkspace bwd_workspace(const AttentionParams& p, bool deterministic) {
  BwdWorkspace w;
  const size_t rows = static_cast<size_t>(q_rows(p)) * static_cast<size_t>(p.heads_q);
  w.delta_bytes = rows * sizeof(float);
  w.dq_accum_offset = align_up(w.delta_bytes, 256);
  w.dq_accum_bytes = deterministic ? 0 : rows * static_cast<size_t>(p.head_dim) * sizeof(float);
  w.total = w.dq_accum_offset + w.dq_accum_bytes;
  return w;
}

}  // namespace longattn::cuda::flash
