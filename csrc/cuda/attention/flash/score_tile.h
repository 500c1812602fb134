// One thread's share of a (query tile x key tile) score accumulator: raw q.k products turned
// into logits (common/scores.h: softcap, then ALiBi) and masked (common/mask.h), in the same
// order and fp32 roundings as the CPU kernel (cpu/tile.h transform_row / mask_row).
//
// Tensors come as (row, column) views: s(mi, ni) the score, c(mi, ni) its tile coordinate
// (row in the query tile, column in the key tile) from an identity tensor partitioned like
// the accumulator, so the indexing follows the MMA layout by construction.
#pragma once
#include <cute/tensor.hpp>

#include "common/attention_params.h"

namespace longattn::cuda::flash {

// Non-plain logits (ScoreParams::plain() false): x = softcap * tanh(x * (row_scale / softcap))
// or x * row_scale, then x -= slope * |p - s|. row_scale[mi] is the row's
// float(scale * logn_factor(p)); p0 is the position of tile row 0, s0 of tile column 0.
template <class Scores, class Coords, int kRows>
__device__ __forceinline__ void transform_scores(Scores& s, const Coords& c,
                                                 const float (&row_scale)[kRows], float softcap,
                                                 bool alibi, float slope, int64_t p0, int64_t s0) {
  using namespace cute;
  static_assert(decltype(size<0>(s))::value == kRows);
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    const float rs = row_scale[mi];
    if (softcap > 0.f) {
      const float inv_cap = rs / softcap;
#pragma unroll
      for (int ni = 0; ni < size<1>(s); ++ni) {
        s(mi, ni) = softcap_logit(s(mi, ni), inv_cap, softcap);
      }
    } else {
#pragma unroll
      for (int ni = 0; ni < size<1>(s); ++ni) s(mi, ni) *= rs;
    }
    if (alibi) {
      // |p - s| as float: exact below 2^24, as in the CPU kernel.
      const float d0 = static_cast<float>(p0 + get<0>(c(mi, 0)) - s0);
#pragma unroll
      for (int ni = 0; ni < size<1>(s); ++ni) {
        s(mi, ni) -= slope * fabsf(d0 - static_cast<float>(get<1>(c(mi, ni))));
      }
    }
  }
}

// Visibility inside one (query tile x key tile) block, in tile coordinates (row r, column j).
// MaskParams::row_ranges gives a row's visible keys as the sink range (ending at
// min(sinks, p + 1) under causal, at sinks otherwise) and the band [p - left, p + upper];
// moving down r rows moves the band and the causal end by r. So the block is described by four
// column bounds of row 0 and each row costs a few adds. Only the union of the two ranges
// matters here, so the band is not trimmed against the sinks. nk: valid key columns (a full
// tile cut short by its range end takes the same test: every key is visible there).
struct TileMask {
  int nk;
  int sink_end, sink_causal_end, band_lo, band_hi;  // row-0 bounds, clamped to +-2^30

  __host__ __device__ __forceinline__ TileMask(const MaskParams& m, int64_t p0, int64_t s0,
                                               int valid_keys)
      : nk(valid_keys) {
    // Clamping to +-2^30 changes no comparison against j in [0, nk) after adding r < 2^30.
    const auto col = [s0](int64_t key_pos) {
      return static_cast<int>(max64(-(int64_t(1) << 30), min64(int64_t(1) << 30, key_pos - s0)));
    };
    sink_end = col(m.sinks);
    sink_causal_end = m.causal ? col(p0 + 1) : (1 << 30);
    band_lo = col(p0 - m.left);
    band_hi = col(p0 + m.upper() + 1);
  }

  // Row r's visible columns: j < sink_hi, or band_lo <= j < band_hi, and j < nk.
  struct Row {
    int nk, sink_hi, band_lo, band_hi;
    // Bitwise, not short-circuit: compiles to compares and selects, no branches.
    __host__ __device__ __forceinline__ bool visible(int j) const {
      return (j < nk) & ((j < sink_hi) | ((j >= band_lo) & (j < band_hi)));
    }
  };
  __host__ __device__ __forceinline__ Row row(int r) const {
    const int causal_end = sink_causal_end + r;
    return {nk, sink_end < causal_end ? sink_end : causal_end, band_lo + r, band_hi + r};
  }
};

// Set to -inf every score that TileMask says is not visible.
template <class Scores, class Coords>
__device__ __forceinline__ void mask_scores(Scores& s, const Coords& c, const TileMask& mask) {
  using namespace cute;
#pragma unroll
  for (int mi = 0; mi < size<0>(s); ++mi) {
    const TileMask::Row row = mask.row(get<0>(c(mi, 0)));
#pragma unroll
    for (int ni = 0; ni < size<1>(s); ++ni) {
      s(mi, ni) = row.visible(get<1>(c(mi, ni))) ? s(mi, ni) : -INFINITY;
    }
  }
}

}  // namespace longattn::cuda::flash
