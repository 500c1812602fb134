// The long-context mask family (causal, sliding window, attention sinks, their lambda
// combination) on absolute positions, and the analytic classification of query x key tiles
// that lets every kernel skip empty tiles and mask only partial ones.
//
// Positions: query row i is at p = q_start + i, key j at s = k_start + j.
// Key s is visible from query p iff
//     (!causal || s <= p)  &&  (s < sinks  ||  p - left <= s <= p + right).
// An unbounded window side is kUnbounded; arithmetic on it cannot overflow for |p| < 2^61.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace longattn {

constexpr int64_t kUnbounded = int64_t(1) << 62;

// Half-open index interval [lo, hi).
struct Range {
  int64_t lo, hi;
  LONGATTN_HD bool empty() const { return hi <= lo; }
  LONGATTN_HD int64_t size() const { return hi > lo ? hi - lo : 0; }
};

LONGATTN_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
LONGATTN_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
LONGATTN_HD Range intersect(Range a, Range b) { return {max64(a.lo, b.lo), min64(a.hi, b.hi)}; }
LONGATTN_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class TileKind : int { kEmpty = 0, kPartial = 1, kFull = 2 };

struct MaskParams {
  int64_t q_start = 0;  // absolute position of query row 0
  int64_t k_start = 0;  // absolute position of key 0
  int64_t left = kUnbounded;
  int64_t right = kUnbounded;
  int64_t sinks = 0;
  bool causal = false;

  // Keys s <= p + upper() are allowed by the window and the causal rule together.
  LONGATTN_HD int64_t upper() const { return causal ? min64(right, 0) : right; }
  // The window band [p - left, p + upper] is empty for every p.
  // (Two unbounded sides would overflow the sum, and are never empty.)
  LONGATTN_HD bool band_empty() const {
    return left < kUnbounded && upper() < kUnbounded && left + upper() < 0;
  }

  LONGATTN_HD bool visible(int64_t p, int64_t s) const {
    if (causal && s > p) return false;
    if (s < sinks) return true;
    return s >= p - left && s <= p + right;
  }

  // Classify the tile of query positions [p0, p1] x key positions [s0, s1] (inclusive).
  // Full means no per-element mask is needed; the test is sufficient, not necessary, so a
  // tile that is full only through the union of window and sinks is reported partial.
  LONGATTN_HD TileKind classify(int64_t p0, int64_t p1, int64_t s0, int64_t s1) const {
    const int64_t up = upper();
    const bool band_full = !band_empty() && s0 >= p1 - left && s1 <= p0 + up;
    const bool sink_full = s1 < sinks && (!causal || s1 <= p0);
    if (band_full || sink_full) return TileKind::kFull;
    const bool band_none = band_empty() || s1 < p0 - left || s0 > p1 + up;
    const bool sink_none = s0 >= sinks || (causal && s0 > p1);
    return (band_none && sink_none) ? TileKind::kEmpty : TileKind::kPartial;
  }

  // Visible keys of query position p as at most two disjoint key-position ranges, the sink
  // range first. Used per row inside partial tiles.
  LONGATTN_HD void row_ranges(int64_t p, Range* sink, Range* band) const {
    const int64_t causal_hi = causal ? p + 1 : kUnbounded;
    *sink = Range{-kUnbounded, min64(sinks, causal_hi)};
    if (band_empty()) {
      *band = Range{0, 0};
    } else {
      *band = Range{p - left, p + upper() + 1};
    }
    // The band may overlap the sinks: keep the ranges disjoint so no key counts twice.
    if (!band->empty() && band->lo < sink->hi) band->lo = sink->hi;
  }

  // Key-index ranges (j, not positions) that query rows [i0, i1) may see, clipped to [0, Lk):
  // the sink keys first, then the window band, disjoint. A superset: tiles inside still get
  // classified.
  LONGATTN_HD void key_ranges(int64_t i0, int64_t i1, int64_t Lk, Range* sink, Range* band) const {
    const int64_t p0 = q_start + i0, p1 = q_start + i1 - 1;
    const Range keys{0, Lk};
    const int64_t sink_end_pos = min64(sinks, causal ? p1 + 1 : kUnbounded);
    *sink = intersect(Range{0, sink_end_pos - k_start}, keys);
    if (band_empty()) {
      *band = Range{0, 0};
    } else {
      *band = intersect(Range{p0 - left - k_start, p1 + upper() + 1 - k_start}, keys);
    }
    if (!sink->empty() && !band->empty() && band->lo < sink->hi) {
      band->lo = sink->hi;  // overlap: keep disjoint
    }
  }

  // Whether query row i sees any key of [0, Lk) (the fully-masked-row test; exact for one row).
  LONGATTN_HD bool row_sees_keys(int64_t i, int64_t Lk) const {
    Range sink, band;
    key_ranges(i, i + 1, Lk, &sink, &band);
    return !sink.empty() || !band.empty();
  }

  // Query-index range (i) whose rows may see any key of [j0, j1), clipped to [0, Lq).
  // The sink part reaches to the end of the sequence and, under causal, starts at or before
  // the band part, so the union is one interval.
  LONGATTN_HD Range query_range(int64_t j0, int64_t j1, int64_t Lq) const {
    const int64_t s0 = k_start + j0, s1 = k_start + j1 - 1;
    int64_t lo = kUnbounded, hi = -kUnbounded;
    if (!band_empty()) {
      lo = s0 - upper();
      hi = s1 + left + 1;
    }
    if (s0 < sinks) {
      lo = min64(lo, causal ? s0 : -kUnbounded);
      hi = kUnbounded;
    }
    return intersect(Range{lo - q_start, hi - q_start}, Range{0, Lq});
  }
};

}  // namespace longattn
