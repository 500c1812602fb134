// Helpers shared by the CPU forward and backward kernels: the accumulation type, loading a
// tile of rows into it, and the per-row logit transform and mask of a score tile.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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
      for (int64_t j = 0; j < n; ++j) {
        const A t = x[j] * inv;
        softcap_grad[j] = A(1) - t * t;
      }
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

// Set the masked keys of one row of a partial tile to -inf. Returns false when no key of
// the row is visible in this tile.
template <typename A>
inline bool mask_row(A* x, int64_t n, const MaskParams& m, int64_t p, int64_t s_first) {
  Range sink, band;
  m.row_ranges(p, &sink, &band);
  const Range cols{0, n};
  Range a = intersect(Range{sink.lo - s_first, sink.hi - s_first}, cols);
  Range b = intersect(Range{band.lo - s_first, band.hi - s_first}, cols);
  if (a.empty()) a = Range{0, 0};
  if (b.empty()) b = Range{a.hi, a.hi};
  if (a.empty() && b.empty()) {
    std::fill(x, x + n, neg_inf<A>());
    return false;
  }
  if (a.empty()) a = Range{b.lo, b.lo};
  // a precedes b (sinks come first and the ranges are disjoint).
  std::fill(x, x + a.lo, neg_inf<A>());
  std::fill(x + a.hi, x + b.lo, neg_inf<A>());
  std::fill(x + b.hi, x + n, neg_inf<A>());
  return true;
}

}  // namespace longattn::cpu
