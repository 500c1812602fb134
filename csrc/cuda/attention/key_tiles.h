// The key tiles one query tile visits, shared by the tensor-core forwards (flash/ and sm90/) and
// their host checks, so that every kernel (and, in sm90/, its producer and consumer warps) walks
// one list: the tiles of range 0 (sink keys) then those of range 1 (window band), each range cut
// into kBlockN-key tiles from its start, the last one cut at the range end.
#pragma once
#include <cstdint>

#include "common/mask.h"

namespace longattn::cuda {

// Key indices fit int32 (checked at launch). Classification needs only the mask's
// window/sink/causal fields, which the kernel reads from its parameters (q_start is folded
// into p0/p1).
template <int kBlockN>
struct KeyTiles {
  int lo0 = 0, hi0 = 0, lo1 = 0, hi1 = 0;  // key-index ranges [lo, hi)
  int first_range_tiles = 0, count = 0;
  int64_t p0 = 0, p1 = 0;  // positions of the tile's first and last valid query rows

  __host__ __device__ __forceinline__ KeyTiles(const MaskParams& m, int64_t i0, int64_t nq, int64_t k_len) {
    Range r0, r1;
    m.key_ranges(i0, i0 + nq, k_len, &r0, &r1);
    // Empty ranges become [lo, lo) so their tile count is 0.
    lo0 = static_cast<int>(r0.empty() ? 0 : r0.lo);
    hi0 = static_cast<int>(r0.empty() ? 0 : r0.hi);
    lo1 = static_cast<int>(r1.empty() ? 0 : r1.lo);
    hi1 = static_cast<int>(r1.empty() ? 0 : r1.hi);
    first_range_tiles = (hi0 - lo0 + kBlockN - 1) / kBlockN;
    count = first_range_tiles + (hi1 - lo1 + kBlockN - 1) / kBlockN;
    p0 = m.q_start + i0;
    p1 = p0 + nq - 1;
  }

  // Tile t: first key index j0 and its valid key count nk (1..kBlockN).
  __host__ __device__ __forceinline__ void at(int t, int* j0, int* nk) const {
    const bool first = t < first_range_tiles;
    *j0 = first ? lo0 + t * kBlockN : lo1 + (t - first_range_tiles) * kBlockN;
    const int left = (first ? hi0 : hi1) - *j0;
    *nk = left < kBlockN ? left : kBlockN;
  }

  __host__ __device__ __forceinline__ TileKind kind(const MaskParams& m, int j0, int nk) const {
    const int64_t s0 = m.k_start + j0;
    return m.classify(p0, p1, s0, s0 + nk - 1);
  }

  // The first tile >= t that is not empty, or count.
  __host__ __device__ __forceinline__ int next_visible(const MaskParams& m, int t) const {
    for (; t < count; ++t) {
      int j0, nk;
      at(t, &j0, &nk);
      if (kind(m, j0, nk) != TileKind::kEmpty) break;
    }
    return t;
  }
};

}  // namespace longattn::cuda
