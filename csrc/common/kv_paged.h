// The block remapping of a paged compaction (compact_paged_), shared by the CPU and CUDA
// kernels. No torch includes.
//
// A compaction keeps keep[0 .. n) (ascending) of a head's slots: slot keep[j] becomes slot j.
// Over a paged head (common/kv_slots.h) slot j of the result lives in new block jb = j / bs,
// which is written in place into the head's old block jb (rows move down, as in a contiguous
// cache) unless it can be *remapped*: keep its kept rows where they are, in old block ob, and
// have the table name that block instead. New block jb is remappable onto ob when its entries are
// old block ob's rows at their own offsets: keep[jb * bs + i] == ob * bs + i for each of its
// entries (all bs of them, or the last block's rest), and none is re-rotated. Evicting whole
// blocks thus moves nothing: later blocks shift down in the table and the evicted ones are freed.
//
// A remap must not name a block that the moves write: old block ob is written when it is some
// new block's in-place destination, i.e. when ob < nb_new and new block ob is not remapped. So
// remapped[jb] = ob >= 0 && (ob == jb || ob >= nb_new || remapped[ob]); since ob >= jb (kept
// slots only move down), deciding jb from nb_new - 1 down to 0 sees remapped[ob] decided.
// With the moves confined to non-remapped blocks, each writes only old block jb's rows, which
// hold no source still to be read (sources of later blocks lie in later old blocks), exactly as
// in the contiguous compaction.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace longattn::kv {

// The old block new block jb of a compaction keeping n slots can be remapped onto, or -1.
// `shifted(j)`: kept slot j is re-rotated (never remapped).
template <typename I, typename Shifted>
LONGATTN_HD int64_t remap_source(const I* keep, int64_t n, int64_t block_size, int64_t jb,
                                 Shifted&& shifted) {
  const int64_t j0 = jb * block_size;
  const int64_t cnt = n - j0 < block_size ? n - j0 : block_size;
  const int64_t s0 = static_cast<int64_t>(keep[j0]);
  if (s0 % block_size != 0) return -1;
  for (int64_t i = 0; i < cnt; ++i) {
    if (static_cast<int64_t>(keep[j0 + i]) != s0 + i || shifted(j0 + i)) return -1;
  }
  return s0 / block_size;
}

// The rule above, for one new block whose source is ob (>= 0) and whose remap of old block ob,
// if that is a new block too, is known.
LONGATTN_HD bool remap_allowed(int64_t jb, int64_t ob, int64_t nb_new, bool ob_remapped) {
  return ob == jb || ob >= nb_new || ob_remapped;
}

}  // namespace longattn::kv
