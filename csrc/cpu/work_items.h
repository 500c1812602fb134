// The work lists of the CPU kernels, ordered costliest first for dynamic scheduling. The cost
// is the visible key count the mask allows a tile, so a causal or windowed call balances.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/attention_params.h"
#include "cpu/attention_kernels.h"

namespace longattn::cpu {

struct WorkItem {
  int64_t b;     // sequence
  int64_t h;     // head (q head in the forward, kv head in the backward)
  int64_t tile;  // query tile (forward) or key chunk (backward)
  int64_t cost;
};

inline void sort_by_cost(std::vector<WorkItem>& items) {
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
}

// Forward: one item per (sequence, q head, query tile).
inline std::vector<WorkItem> query_tile_items(const AttentionParams& p, const CpuTiles& t) {
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqInfo si = seq_info(p, b);
    for (int64_t i0 = 0, tile = 0; i0 < si.q_len; i0 += t.q, ++tile) {
      Range a, c;
      si.mask.key_ranges(i0, std::min(i0 + t.q, si.q_len), si.k_len, &a, &c);
      const int64_t cost = 1 + a.size() + c.size();
      for (int64_t h = 0; h < p.heads_q; ++h) items.push_back({b, h, tile, cost});
    }
  }
  sort_by_cost(items);
  return items;
}

}  // namespace longattn::cpu
