// CPU attention kernels: entry points the op layer calls after it has checked the tensors and
// filled AttentionParams. Element type T is float, double, c10::BFloat16 or c10::Half;
// arithmetic is fp32 (fp64 for double).
#pragma once
#include <cstdint>

#include "common/attention_params.h"

namespace longattn::cpu {

// Tile sizes of the CPU kernels: queries x keys per score tile.
struct CpuTiles {
  int64_t q = 128;
  int64_t k = 512;
};
CpuTiles choose_tiles(const AttentionParams& p);

template <typename T>
void attention_forward(const AttentionParams& p);

// Gradients. dout, out contiguous like out; dlse like lse or null. delta is scratch the
// caller allocates with lse's shape. dq/dk/dv are written in full (dk, dv contiguous with
// k's shape (B, Lk, Hkv, D) / (Tk, Hkv, D)); dsink [heads_q] fp32 or null.
// Buffers of lse's dtype (dlse, delta) and of the accumulation type (dq_accum) are acc_t<T>.
struct BackwardBuffers {
  const void* dout = nullptr;
  const void* dlse = nullptr;  // null: no lse gradient
  void* delta = nullptr;       // scratch, lse's shape
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dsink = nullptr;  // sink_logits' dtype
  void* dq_accum = nullptr;  // zeroed, chunks x (q elements), or null: accumulate into dq (zeroed)
  int64_t dq_chunks = 1;
  int64_t total_k = 0;  // tokens in k (rows of dk/dv)
};

// How many key chunks the backward splits each (batch, kv head) into; each chunk accumulates
// its own dQ, reduced in a fixed order afterwards. Depends on shapes only, never on the
// thread count, so results are bit-identical on any machine with the same build.
int64_t backward_dq_chunks(const AttentionParams& p);

template <typename T>
void attention_backward(const AttentionParams& p, const BackwardBuffers& g);

}  // namespace longattn::cpu
