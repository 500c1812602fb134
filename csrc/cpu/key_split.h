// Split-K of the CPU forward (flash-decoding style). A call with few work items and long key
// ranges (decode, chunked prefill against a long context) would leave cores idle: each
// (sequence, q head, query tile) item then has its key tiles cut into contiguous chunks, each
// chunk computes a partial (out, lse) into scratch, and a second pass merges a row's chunks in
// chunk order (common/merge.h).
//
// The rule:
//   * split only when items < 2 x at::get_num_threads(): with more items, dynamic scheduling
//     over items already keeps every thread busy;
//   * and only items with more than one chunk of key tiles are split, a chunk being
//     ceil(kSplitChunkKeys / tile keys) key tiles, counted over the item's visible ranges
//     (sink range, then window band; MaskParams::key_ranges);
//   * the chunk boundaries depend on the shapes only, never on the thread count, and chunks
//     merge in a fixed order: while the split is on, the bits do not depend on the thread
//     count or on which thread ran which chunk. (Split and unsplit agree to rounding.)
// 2048 keys per chunk: a chunk's work (nq x 2048 x D x 4 flops) dwarfs its partial write and
// merge (nq x D), and 32K keys give 16 chunks, enough to balance a few threads. Past
// kMaxSplitChunks x 2048 keys the chunks grow instead of multiplying, so an item's scratch
// (chunks x nq x D) stays bounded however long the context (1M keys: 64 chunks of 16K keys).
//
// cpu/tuning.h's splitk overrides the rule (tests, tuning): 0 never splits; a positive n
// splits every item with more than n key tiles into chunks of n tiles, whatever the counts
// (with small forced tiles, small shapes take the split path too).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/tuning.h"
#include "cpu/work_items.h"

namespace longattn::cpu {

constexpr int64_t kSplitChunkKeys = 2048;
constexpr int64_t kMaxSplitChunks = 64;

// A query tile's key tiles, in order: those of the sink range, then those of the window band.
inline int64_t key_tile_count(const Range (&ranges)[2], int64_t tile_keys) {
  return ceil_div(ranges[0].size(), tile_keys) + ceil_div(ranges[1].size(), tile_keys);
}

inline void item_key_ranges(const AttentionParams& p, const CpuTiles& t, const WorkItem& it,
                            Range (&ranges)[2]) {
  const SeqInfo si = seq_info(p, it.b);
  const int64_t i0 = it.tile * t.q;
  si.mask.key_ranges(i0, std::min(i0 + t.q, si.q_len), si.k_len, &ranges[0], &ranges[1]);
}

// One unit of forward work: key tiles [tile_begin, tile_end) of items[item]. slot < 0 means
// the whole item, written to the output; otherwise a chunk whose partial goes to scratch slot.
struct ForwardUnit {
  int64_t item;
  int64_t tile_begin, tile_end;
  int64_t slot;
  int64_t cost;
};

// An item computed in chunks: slots [first_slot, first_slot + chunks), in key order.
struct SplitItem {
  int64_t item;
  int64_t first_slot;
  int64_t chunks;
};

struct ForwardPlan {
  std::vector<ForwardUnit> units;  // costliest first
  std::vector<SplitItem> split;
  int64_t slots = 0;
};

// Key tiles per chunk, or 0 for no split (the rule above).
inline int64_t split_chunk_tiles(const CpuTiles& t, int64_t item_count) {
  const int64_t forced = cpu_tuning().splitk;  // an override (cpu/tuning.h)
  if (forced >= 0) return forced;
  if (item_count >= 2 * static_cast<int64_t>(at::get_num_threads())) return 0;
  return ceil_div(kSplitChunkKeys, t.k);
}

inline ForwardPlan plan_forward(const AttentionParams& p, const CpuTiles& t,
                                const std::vector<WorkItem>& items) {
  ForwardPlan plan;
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t chunk_tiles = split_chunk_tiles(t, n);
  for (int64_t i = 0; i < n; ++i) {
    Range ranges[2];
    item_key_ranges(p, t, items[i], ranges);
    const int64_t tiles = key_tile_count(ranges, t.k);
    if (chunk_tiles == 0 || tiles <= chunk_tiles) {
      plan.units.push_back({i, 0, tiles, -1, items[i].cost});
      continue;
    }
    const int64_t per_chunk = std::max(chunk_tiles, ceil_div(tiles, kMaxSplitChunks));
    const int64_t chunks = ceil_div(tiles, per_chunk);
    plan.split.push_back({i, plan.slots, chunks});
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c * per_chunk, e = std::min(tiles, b + per_chunk);
      plan.units.push_back({i, b, e, plan.slots + c, 1 + (e - b) * t.k});
    }
    plan.slots += chunks;
  }
  std::stable_sort(plan.units.begin(), plan.units.end(),
                   [](const ForwardUnit& a, const ForwardUnit& b) { return a.cost > b.cost; });
  return plan;
}

}  // namespace longattn::cpu
