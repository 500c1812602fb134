// Shared-memory layouts and launch plans of the SIMT rope_attention kernels, one definition for
// the host (which sizes the launch) and the device (which carves the buffer). The tiles are the
// SIMT attention kernels' (attention/simt/simt_tiles.h: rows x head dim in the accumulation
// type, tile sizes shrinking with the head dim); a call with a remap holds each query and key
// tile on both sides (near and far rotations, common/remap.h) and a second score tile, a call
// without one only the near side.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/rope_attention_params.h"
#include "cuda/attention/simt/simt_tiles.h"

namespace longattn::cuda::remap {

using simt::kKeyMajorTiles;
using simt::kQueryMajorTiles;
using simt::kSmemBudget;
using simt::kThreads;
using simt::kWarps;
using simt::SimtLaunch;
using simt::SimtTiles;

// Offsets (in elements of A); a far buffer is empty (size 0, at the next offset) without a
// remap. `total` is the size.
struct ForwardSmem {
  int q, q_far, o, k, k_far, v, s, s_far, row_m, row_l, row_alpha, row_rs, total;
  LONGATTN_HD ForwardSmem(const SimtTiles& t, bool far) {
    const int f = far ? 1 : 0;
    q = 0;
    q_far = q + t.bq * t.ld;
    o = q_far + f * t.bq * t.ld;          // output accumulator
    k = o + t.bq * t.ld;
    k_far = k + t.bk * t.ld;
    v = k_far + f * t.bk * t.ld;
    s = v + t.bk * t.ld;                  // near scores, then probabilities
    s_far = s + t.bq * t.lds;             // far scores
    row_m = s_far + f * t.bq * t.lds;
    row_l = row_m + t.bq;
    row_alpha = row_l + t.bq;
    row_rs = row_alpha + t.bq;
    total = row_rs + t.bq;
  }
};

// The backward's passes share the gradient tile: Q and K on each side, dO, V, the score tiles
// (near scores then P; far scores then far dS; dP then near dS) and the row statistics; the dQ
// pass adds dQ per side, the dK/dV pass dK per side and dV.
struct GradSmem {
  int q, q_far, dout, k, k_far, v, s, s_far, dp, row_lse, row_delta, row_rs, acc, acc_far, dv,
      total;
  LONGATTN_HD GradSmem(const SimtTiles& t, bool far, bool key_major) {
    const int f = far ? 1 : 0;
    const int acc_rows = key_major ? t.bk : t.bq;  // dK or dQ
    q = 0;
    q_far = q + t.bq * t.ld;
    dout = q_far + f * t.bq * t.ld;
    k = dout + t.bq * t.ld;
    k_far = k + t.bk * t.ld;
    v = k_far + f * t.bk * t.ld;
    s = v + t.bk * t.ld;
    s_far = s + t.bq * t.lds;
    dp = s_far + f * t.bq * t.lds;
    row_lse = dp + t.bq * t.lds;
    row_delta = row_lse + t.bq;
    row_rs = row_delta + t.bq;
    acc = row_rs + t.bq;
    acc_far = acc + acc_rows * t.ld;
    dv = acc_far + f * acc_rows * t.ld;
    total = dv + (key_major ? t.bk * t.ld : 0);
  }
};

// The first (bq, bk) of `candidates` within the caps whose layout fits min(kSmemBudget, opt-in
// limit), as simt::choose_tiles; size(t) gives a layout's elements.
template <int N, typename Size>
inline SimtTiles choose_tiles(const int (&candidates)[N][2], int64_t head_dim, size_t elem_bytes,
                              size_t optin_limit, int64_t max_bq, int64_t max_bk, Size&& size) {
  const size_t budget = optin_limit < kSmemBudget ? optin_limit : kSmemBudget;
  for (const auto& c : candidates) {
    if (c[0] > max_bq || c[1] > max_bk) continue;
    SimtTiles t = simt::make_tiles(c[0], c[1], head_dim);
    const size_t bytes = static_cast<size_t>(size(t)) * elem_bytes;
    if (bytes <= budget) {
      t.smem_bytes = bytes;
      return t;
    }
  }
  return SimtTiles{};
}

// Query-major passes (forward, dQ): a CTA per (query tile, q head, sequence); size(t) gives
// the pass's layout in elements.
template <typename Size>
inline SimtLaunch query_major_launch(const AttentionParams& p, size_t elem_bytes, size_t optin,
                                     Size&& size) {
  SimtLaunch l;
  l.tiles = choose_tiles(kQueryMajorTiles, p.head_dim, elem_bytes, optin, simt::tile_cap(p.seqlen_q),
                         simt::tile_cap(p.seqlen_k), size);
  if (l.tiles.smem_bytes > 0) {
    l.blocks = simt::checked_grid(ceil_div(p.seqlen_q, l.tiles.bq) * p.batch * p.heads_q);
  }
  return l;
}

inline SimtLaunch forward_launch(const RopeAttentionParams& rp, size_t elem_bytes, size_t optin) {
  const bool far = rp.remap.has_far();
  return query_major_launch(rp.attn, elem_bytes, optin,
                            [&](const SimtTiles& t) { return ForwardSmem(t, far).total; });
}

inline SimtLaunch dq_launch(const RopeAttentionParams& rp, size_t elem_bytes, size_t optin) {
  const bool far = rp.remap.has_far();
  return query_major_launch(rp.attn, elem_bytes, optin,
                            [&](const SimtTiles& t) { return GradSmem(t, far, false).total; });
}

// The key-major pass (dK, dV): a CTA per (key block, kv head, sequence).
inline SimtLaunch dkdv_launch(const RopeAttentionParams& rp, size_t elem_bytes, size_t optin) {
  const AttentionParams& p = rp.attn;
  const bool far = rp.remap.has_far();
  SimtLaunch l;
  l.tiles = choose_tiles(kKeyMajorTiles, p.head_dim, elem_bytes, optin, simt::tile_cap(p.seqlen_q),
                         simt::tile_cap(p.seqlen_k),
                         [&](const SimtTiles& t) { return GradSmem(t, far, true).total; });
  if (l.tiles.smem_bytes > 0) {
    l.blocks = simt::checked_grid(KeyBlocks::max_count(p.seqlen_k, l.tiles.bk) * p.batch * p.heads_kv);
  }
  return l;
}

}  // namespace longattn::cuda::remap
