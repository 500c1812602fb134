// Tile shapes and shared-memory layouts of the SIMT attention kernels, one definition for the
// host (which sizes the launch) and the device (which carves the buffer).
//
// Every tile lives in shared memory in the accumulation type A (fp32, fp64 for double), so
// no kernel holds a head-dim-sized register array: the head dim is a runtime value and the
// tile sizes shrink with it to fit the shared-memory budget.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/attention_params.h"
#include "common/host_device.h"
#include "common/key_blocks.h"

namespace longattn::cuda::simt {

constexpr int kThreads = 256;  // every SIMT kernel runs 8 warps
constexpr int kWarps = kThreads / 32;

struct SimtTiles {
  int bq = 0;       // query rows per tile (a power of two >= 4)
  int bk = 0;       // keys per tile (a power of two >= 4)
  int bk_log2 = 0;
  int dp = 0;       // head dim rounded up to a multiple of 4 (the GEMMs' 4x4 micro-tiles)
  int ld = 0;       // row stride of [rows x head dim] tiles: dp + 1, odd, so walking a
                    // column across rows hits distinct banks
  int lds = 0;      // row stride of [bq x bk] score tiles: bk + 1
  size_t smem_bytes = 0;
};

LONGATTN_HD SimtTiles make_tiles(int bq, int bk, int64_t head_dim) {
  SimtTiles t;
  t.bq = bq;
  t.bk = bk;
  while ((1 << t.bk_log2) < bk) ++t.bk_log2;
  t.dp = static_cast<int>((head_dim + 3) / 4 * 4);
  t.ld = t.dp + 1;
  t.lds = bk + 1;
  return t;
}

// Offsets (in elements of A) of each kernel's buffers. `total` is the size.
struct ForwardSmem {
  int q, o, k, v, s, row_m, row_l, row_alpha, row_rs, total;
  LONGATTN_HD explicit ForwardSmem(const SimtTiles& t) {
    q = 0;
    o = q + t.bq * t.ld;       // output accumulator
    k = o + t.bq * t.ld;
    v = k + t.bk * t.ld;
    s = v + t.bk * t.ld;       // scores, then probabilities
    row_m = s + t.bq * t.lds;  // running max
    row_l = row_m + t.bq;      // running sum
    row_alpha = row_l + t.bq;  // this tile's rescale of the accumulator
    row_rs = row_alpha + t.bq; // scale * log-n factor of the row
    total = row_rs + t.bq;
  }
};

// The dQ pass (query-major) and the dK/dV pass (key-major) share the per-row arrays.
struct DqSmem {
  int q, dout, dq, k, v, s, dp, row_lse, row_delta, row_rs, total;
  LONGATTN_HD explicit DqSmem(const SimtTiles& t) {
    q = 0;
    dout = q + t.bq * t.ld;
    dq = dout + t.bq * t.ld;
    k = dq + t.bq * t.ld;
    v = k + t.bk * t.ld;
    s = v + t.bk * t.ld;          // scores, then P
    dp = s + t.bq * t.lds;        // dP, then dS
    row_lse = dp + t.bq * t.lds;
    row_delta = row_lse + t.bq;
    row_rs = row_delta + t.bq;
    total = row_rs + t.bq;
  }
};

struct DkDvSmem {
  int k, v, dk, dv, q, dout, s, dp, row_lse, row_delta, row_rs, total;
  LONGATTN_HD explicit DkDvSmem(const SimtTiles& t) {
    k = 0;
    v = k + t.bk * t.ld;
    dk = v + t.bk * t.ld;
    dv = dk + t.bk * t.ld;
    q = dv + t.bk * t.ld;
    dout = q + t.bq * t.ld;
    s = dout + t.bq * t.ld;
    dp = s + t.bq * t.lds;
    row_lse = dp + t.bq * t.lds;
    row_delta = row_lse + t.bq;
    row_rs = row_delta + t.bq;
    total = row_rs + t.bq;
  }
};

// Shared memory one CTA asks for at most: two CTAs fit an A100/H100 SM (164/228 KiB).
constexpr size_t kSmemBudget = 80 * 1024;

// The first (bq, bk) of `candidates` with bq <= max_bq and bk <= max_bk whose layout fits
// min(kSmemBudget, opt-in limit); smem_bytes == 0 when none does (never for head dims <= 256
// on sm_70+: the lists end with 4x4).
template <typename Layout, int N>
inline SimtTiles choose_tiles(const int (&candidates)[N][2], int64_t head_dim, size_t elem_bytes,
                              size_t optin_limit, int64_t max_bq, int64_t max_bk) {
  const size_t budget = optin_limit < kSmemBudget ? optin_limit : kSmemBudget;
  for (const auto& c : candidates) {
    if (c[0] > max_bq || c[1] > max_bk) continue;
    SimtTiles t = make_tiles(c[0], c[1], head_dim);
    const size_t bytes = static_cast<size_t>(Layout(t).total) * elem_bytes;
    if (bytes <= budget) {
      t.smem_bytes = bytes;
      return t;
    }
  }
  return SimtTiles{};
}

// Tiles no taller (wider) than the rows (keys) there are, rounded up to a power of two >= 4:
// a decode step (one query row) gets 4-row tiles, not 64 rows of padding.
inline int64_t tile_cap(int64_t n) {
  int64_t c = 4;
  while (c < n && c < 64) c *= 2;
  return c;
}

// Preference orders. Query-major passes want tall query tiles (each K/V tile is loaded once
// per query tile); the key-major pass wants wide key tiles (each Q/dO tile once per key tile).
constexpr int kQueryMajorTiles[][2] = {
    {64, 64}, {64, 32}, {32, 64}, {32, 32}, {32, 16}, {16, 64}, {16, 32}, {16, 16}, {16, 8},
    {8, 64},  {8, 32},  {8, 16},  {8, 8},   {8, 4},   {4, 64},  {4, 32},  {4, 16},  {4, 8}, {4, 4}};
constexpr int kKeyMajorTiles[][2] = {
    {64, 64}, {32, 64}, {16, 64}, {32, 32}, {16, 32}, {8, 64}, {8, 32}, {16, 16}, {4, 64},
    {8, 16},  {4, 32},  {8, 8},   {4, 16},  {4, 8},   {4, 4}};

// A kernel's launch: its tiles and grid (1-D; blocks < 0: past the grid limit).
struct SimtLaunch {
  SimtTiles tiles;
  int64_t blocks = 0;
  bool ok() const { return tiles.smem_bytes > 0 && blocks >= 0; }
};

inline int64_t checked_grid(int64_t blocks) { return blocks > 0x7fffffff ? -1 : blocks; }

// Query-major passes (forward, dQ): a CTA per (query tile, q head, sequence).
template <typename Layout>
inline SimtLaunch query_major_launch(const AttentionParams& p, size_t elem_bytes, size_t optin) {
  SimtLaunch l;
  l.tiles = choose_tiles<Layout>(kQueryMajorTiles, p.head_dim, elem_bytes, optin,
                                 tile_cap(p.seqlen_q), tile_cap(p.seqlen_k));
  if (l.tiles.smem_bytes > 0) {
    l.blocks = checked_grid(ceil_div(p.seqlen_q, l.tiles.bq) * p.batch * p.heads_q);
  }
  return l;
}

// The key-major pass (dK, dV): a CTA per (key block, kv head, sequence).
inline SimtLaunch key_major_launch(const AttentionParams& p, size_t elem_bytes, size_t optin) {
  SimtLaunch l;
  l.tiles = choose_tiles<DkDvSmem>(kKeyMajorTiles, p.head_dim, elem_bytes, optin,
                                   tile_cap(p.seqlen_q), tile_cap(p.seqlen_k));
  if (l.tiles.smem_bytes > 0) {
    l.blocks = checked_grid(KeyBlocks::max_count(p.seqlen_k, l.tiles.bk) * p.batch * p.heads_kv);
  }
  return l;
}

}  // namespace longattn::cuda::simt
