// Helpers shared by the CPU forward and backward kernels: the accumulation type, loading a
// tile of rows into it, and the per-row logit transform and mask of a score tile.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/attention_params.h"
#include "cpu/vec_math.h"

namespace longattn::cpu {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows [0, rows) of a (rows x D) tile with row stride ld, as acc_t. Same type: the input is
// used in place (BLAS takes the stride); otherwise converted into buf (row stride D).
template <typename T>
inline const acc_t<T>* load_rows(const T* src, int64_t ld, int64_t rows, int64_t D, acc_t<T>* buf,
                                 int64_t* ld_out) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    *ld_out = ld;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * ld, buf + r * D, D);
    *ld_out = D;
    return buf;
  }
}

template <typename T>
inline void store_row(const acc_t<T>* src, T* dst, int64_t D) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    std::copy(src, src + D, dst);
  } else {
    at::vec::convert(src, dst, D);
  }
}

// One query row of a score tile: keys [s_first, s_first + n) against query position p.
struct RowCtx {
  int64_t p;
  int64_t s_first;
  double row_scale;  // scale * logn factor
  float slope;      // ALiBi slope of the head, 0 if none
};

// Turn raw dot products x[0..n) into logits when they are not plain (softcap and/or ALiBi).
// When softcap_grad is non-null it receives d(softcap)/d(input) = 1 - tanh^2 per element.
template <typename A>
inline void transform_row(A* x, int64_t n, const RowCtx& r, const ScoreParams& sp,
                          A* softcap_grad) {
  if (sp.softcap > 0.0) {
    softcap_row<A>(x, n, static_cast<A>(r.row_scale), static_cast<A>(sp.softcap));
    if (softcap_grad != nullptr) {
      const A inv = A(1) / static_cast<A>(sp.softcap);
      for (int64_t j = 0; j < n; ++j) softcap_grad[j] = softcap_derivative(x[j] * inv);
    }
  } else {
    scale_row<A>(x, n, static_cast<A>(r.row_scale));
  }
  if (sp.has_alibi) {
    // |p - s| as float is exact below 2^24; beyond that the bias error is far below its size.
    const A d0 = static_cast<A>(r.p - r.s_first);
    const A slope = static_cast<A>(r.slope);
    for (int64_t j = 0; j < n; ++j) x[j] -= slope * std::abs(d0 - static_cast<A>(j));
  }
}

// Set the masked keys of one row of a partial tile to `fill` (-inf for logits; 0 for the
// backward's P and dS, where a product with a non-finite operand must not reach a pair the
// mask excludes). Returns false when no key of the row is visible in this tile.
template <typename A>
inline bool mask_row(A* x, int64_t n, const MaskParams& m, int64_t p, int64_t s_first,
                     A fill = neg_inf<A>()) {
  Range sink, band;
  m.row_ranges(p, &sink, &band);
  const Range cols{0, n};
  Range a = intersect(Range{sink.lo - s_first, sink.hi - s_first}, cols);
  Range b = intersect(Range{band.lo - s_first, band.hi - s_first}, cols);
  if (a.empty()) a = Range{0, 0};
  if (b.empty()) b = Range{a.hi, a.hi};
  if (a.empty() && b.empty()) {
    std::fill(x, x + n, fill);
    return false;
  }
  if (a.empty()) a = Range{b.lo, b.lo};
  // a precedes b (sinks come first and the ranges are disjoint).
  std::fill(x, x + a.lo, fill);
  std::fill(x + a.hi, x + b.lo, fill);
  std::fill(x + b.hi, x + n, fill);
  return true;
}

// The rows of a tile (K, V or Q) that hold a NaN or an infinity, and the tile with them zeroed.
// A partial tile's GEMMs pair masked (query, key) entries, whose P or dS is 0, with rows of the
// other operand, and 0 * inf = NaN would reach a row the mask keeps apart from it. Such a tile
// computes with the clean copy, and the results that do see a non-finite row are made NaN
// explicitly: the row rule of docs/semantics.md, not the exact inf/NaN pattern per element.
template <typename A>
struct NonfiniteRows {
  std::vector<A> clean;      // the tile with non-finite rows zeroed (row stride D)
  std::vector<uint8_t> bad;  // per row of the tile

  // Fills clean/bad from rows [0, rows) of x and returns true when one is not finite.
  bool scan(const A* x, int64_t ld, int64_t rows, int64_t D) {
    if (!any_nonfinite<A>(x, ld, rows, D)) return false;
    clean.assign(rows * D, A(0));
    bad.assign(rows, 0);
    for (int64_t j = 0; j < rows; ++j) {
      bad[j] = any_nonfinite<A>(x + j * ld, ld, 1, D);
      if (!bad[j]) std::copy(x + j * ld, x + j * ld + D, clean.data() + j * D);
    }
    return true;
  }

  // For key tiles: whether query position pos sees a non-finite key among tile columns
  // [c0, c1) (keys at positions s_first + c).
  bool row_sees_bad(const MaskParams& mask, int64_t pos, int64_t s_first, int64_t c0,
                    int64_t c1) const {
    for (int64_t c = c0; c < c1; ++c) {
      if (bad[c] && mask.visible(pos, s_first + c)) return true;
    }
    return false;
  }
};

// Visit the work of one score tile: query rows [0, nq) of a query tile starting at row i0,
// keys [j0, j0 + nk). A full tile is one block; a partial tile (a window edge, the causal
// diagonal) goes by groups of rows, each trimmed to the hull of the keys those rows can see,
// so the masked triangles are not computed. body(r0, r1, c0, c1, masked) gets tile-relative
// rows and columns and whether per-element masking is still needed.
template <typename Body>
inline void for_each_row_group(const MaskParams& m, TileKind kind, int64_t i0, int64_t nq,
                               int64_t j0, int64_t nk, int64_t k_len, Body&& body) {
  if (kind == TileKind::kFull) {
    body(int64_t(0), nq, int64_t(0), nk, false);
    return;
  }
  constexpr int64_t kRowGroup = 32;
  const Range tile{j0, j0 + nk};
  for (int64_t r0 = 0; r0 < nq; r0 += kRowGroup) {
    const int64_t r1 = std::min(nq, r0 + kRowGroup);
    Range sink, band;
    m.key_ranges(i0 + r0, i0 + r1, k_len, &sink, &band);
    sink = intersect(sink, tile);
    band = intersect(band, tile);
    if (sink.empty() && band.empty()) continue;
    const int64_t lo = sink.empty() ? band.lo : (band.empty() ? sink.lo : std::min(sink.lo, band.lo));
    const int64_t hi = sink.empty() ? band.hi : (band.empty() ? sink.hi : std::max(sink.hi, band.hi));
    const int64_t p0 = m.q_start + i0;
    const bool masked = m.classify(p0 + r0, p0 + r1 - 1, m.k_start + lo, m.k_start + hi - 1) !=
                        TileKind::kFull;
    body(r0, r1, lo - j0, hi - j0, masked);
  }
}

}  // namespace longattn::cpu
