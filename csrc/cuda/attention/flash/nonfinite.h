// Non-finite operands of the flash kernels' partial tiles (docs/semantics.md, "Non-finite
// inputs"). A partial tile's GEMMs pair masked (query, key) entries, whose P or dS is exactly 0,
// with rows of the other operand, and 0 * inf = NaN would reach rows the mask keeps apart from
// them. Such a tile zeroes the operand's non-finite elements in shared memory before the GEMM
// and makes the results that do see a non-finite row NaN explicitly. Full tiles need nothing:
// every pair is visible, so their arithmetic is the dense formula's.
//
// The scan every partial tile pays is a thread's own share of a tile (the 16-byte chunks its
// cp.async wrote: readable after its own wait, no barrier); the rest runs only when a scan found
// something, so it is written for size, not speed.
#pragma once
#include <vector_types.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <type_traits>

#include "cuda/attention/flash/score_tile.h"

namespace longattn::cuda::flash {

// Exponent bits of both 16-bit halves of a 32-bit word; a half is NaN or +-inf iff all are set.
template <typename Element>
constexpr uint32_t kExpBits2 = std::is_same_v<Element, cute::half_t> ? 0x7c007c00u : 0x7f807f80u;

template <typename Element>
__device__ __forceinline__ bool word_nonfinite(uint32_t w) {
  const uint32_t missing = ~w & kExpBits2<Element>;
  return (missing & 0xffffu) == 0u || (missing >> 16) == 0u;
}

template <typename Element>
__device__ __forceinline__ bool chunk_nonfinite(const Element* p) {  // 8 elements, 16-byte aligned
  const uint4 c = *reinterpret_cast<const uint4*>(p);
  return word_nonfinite<Element>(c.x) | word_nonfinite<Element>(c.y) | word_nonfinite<Element>(c.z) |
         word_nonfinite<Element>(c.w);
}

template <typename Element>
__device__ __forceinline__ bool elem_nonfinite(Element x) {
  const uint32_t bits = x.raw();
  return (bits & kExpBits2<Element>) == (kExpBits2<Element> & 0xffffu);
}

// share: a thread's cp.async partition of a shared-memory tile ((8 elements), rows, columns):
// whether it holds a non-finite element.
template <class Share>
__device__ __forceinline__ bool share_has_nonfinite(const Share& share) {
  using namespace cute;
  using Element = typename Share::value_type;
  static_assert(decltype(size<0>(share))::value == 8, "16-byte chunks of 16-bit elements");
  bool bad = false;
#pragma unroll
  for (int m = 0; m < size<1>(share); ++m) {
#pragma unroll
    for (int k = 0; k < size<2>(share); ++k) bad |= chunk_nonfinite<Element>(&share(0, m, k));
  }
  return bad;
}

// Sets the share's non-finite elements to 0 (the rare path).
template <class Share>
__device__ __forceinline__ void zero_share_nonfinite(Share& share) {
  using Element = typename Share::value_type;
#pragma unroll 1
  for (int i = 0; i < cute::size(share); ++i) {
    if (elem_nonfinite<Element>(share(i))) share(i) = Element(0);
  }
}

// Bits [lo, hi) of a 32-bit word, the bounds clamped to [0, 32].
__device__ __forceinline__ uint32_t bit_range(int lo, int hi) {
  lo = lo < 0 ? 0 : lo;
  hi = hi > 32 ? 32 : hi;
  if (hi <= lo) return 0u;
  const uint32_t below_hi = hi == 32 ? ~0u : (1u << hi) - 1u;
  return below_hi & ~((1u << lo) - 1u);
}

// Per tile row (key): whether it holds a non-finite element, as kRows / 32 words (bit j of word
// w: row 32 w + j). Every warp computes all words (lane j scans rows j, 32 + j, ...) and gets
// them from one ballot each, so no shared memory is needed; tile: (kRows x head dim), rows past
// the valid ones zero-filled. Warp-collective. Register arrays are indexed by unrolled loops
// only (a runtime index would move them to local memory).
template <class Ops, int kRows, class Tile>
__device__ __forceinline__ void nonfinite_rows(const Tile& tile, int lane, uint32_t (&words)[kRows / 32]) {
  using namespace cute;
  using Element = typename Tile::value_type;
  constexpr int kCols = decltype(size<1>(tile))::value;
  static_assert(kRows % 32 == 0 && kCols % 8 == 0);
#pragma unroll
  for (int w = 0; w < kRows / 32; ++w) {
    bool bad = false;
#pragma unroll 1
    for (int c = 0; c < kCols; c += 8) bad |= chunk_nonfinite<Element>(&tile(32 * w + lane, c));
    words[w] = Ops::ballot(bad);
  }
}

// Whether a tile row with visible columns `row` (TileMask) sees a column set in `words`.
template <int kWords>
__device__ __forceinline__ bool row_sees_any(const TileMask::Row& row, const uint32_t (&words)[kWords]) {
  const int sink_hi = row.sink_hi < row.nk ? row.sink_hi : row.nk;
  const int band_hi = row.band_hi < row.nk ? row.band_hi : row.nk;
  uint32_t hit = 0u;
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    const int base = 32 * w;
    hit |= words[w] & (bit_range(-base, sink_hi - base) | bit_range(row.band_lo - base, band_hi - base));
  }
  return hit != 0u;
}

// The rows of a thread's accumulator (rowcol view `acc`, coordinates `coords` in the same view,
// row = query row of the tile) that see a non-finite row of `keys` (kKeys x head dim in shared
// memory, the tile's key operand) become NaN. Warp-collective; the caller then synchronizes
// before anyone zeroes `keys`.
template <class Ops, int kKeys, class Acc, class Coords, class Keys>
__device__ __forceinline__ void nan_rows_seeing_nonfinite(Acc& acc, const Coords& coords, const Keys& keys,
                                                          const TileMask& mask, int lane) {
  using namespace cute;
  uint32_t words[kKeys / 32];
  nonfinite_rows<Ops, kKeys>(keys, lane, words);
#pragma unroll
  for (int mi = 0; mi < size<0>(acc); ++mi) {
    if (row_sees_any(mask.row(get<0>(coords(mi, 0))), words)) {
#pragma unroll
      for (int ni = 0; ni < size<1>(acc); ++ni) acc(mi, ni) = NAN;
    }
  }
}

}  // namespace longattn::cuda::flash
