// How the key-major backward passes cut one sequence's keys into blocks. The sink keys get
// blocks of their own: every query row sees them, so a block mixing 64 sinks with 192 window
// keys would be recomputed for every query tile at 4x the needed width.
#pragma once
#include <cstdint>

#include "common/mask.h"

namespace longattn {

struct KeyBlocks {
  int64_t n_sink_keys, k_len, width;

  LONGATTN_HD KeyBlocks(const MaskParams& m, int64_t k_len_, int64_t width_)
      : n_sink_keys(min64(max64(m.sinks - m.k_start, 0), k_len_)), k_len(k_len_), width(width_) {}

  LONGATTN_HD int64_t sink_blocks() const { return ceil_div(n_sink_keys, width); }
  LONGATTN_HD int64_t count() const { return sink_blocks() + ceil_div(k_len - n_sink_keys, width); }
  // Keys [lo, hi) of block kb < count().
  LONGATTN_HD Range block(int64_t kb) const {
    const int64_t ns = sink_blocks();
    if (kb < ns) return {kb * width, min64(n_sink_keys, (kb + 1) * width)};
    const int64_t j0 = n_sink_keys + (kb - ns) * width;
    return {j0, min64(k_len, j0 + width)};
  }
  // count() is at most this for any sequence of at most max_k_len keys (the sink split can
  // add one block).
  LONGATTN_HD static int64_t max_count(int64_t max_k_len, int64_t width) {
    return ceil_div(max_k_len, width) + 1;
  }
};

}  // namespace longattn
