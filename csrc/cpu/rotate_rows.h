// Rows of q, k (forward: rotate) and of their gradients (backward: rotate back) through one
// row of a rotation table (cpu/rotation_tables.h): the rotary part turned by the table's
// angle times the attention scaling, the tail past rotary_dim copied (or passed through).
// The loops run over pairs with unaliased pointers, so the compiler vectorizes the NeoX layout.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/rotation_tables.h"

namespace longattn::cpu {

// y = R x: x and y hold D values.
template <typename C>
inline void rotate_row(const C* __restrict x, const C* __restrict c, const C* __restrict s,
                       int64_t half, bool interleaved, int64_t D, C* __restrict y) {
  if (interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      const C x0 = x[2 * i], x1 = x[2 * i + 1];
      y[2 * i] = x0 * c[i] - x1 * s[i];
      y[2 * i + 1] = x1 * c[i] + x0 * s[i];
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const C x0 = x[i], x1 = x[i + half];
      y[i] = x0 * c[i] - x1 * s[i];
      y[i + half] = x1 * c[i] + x0 * s[i];
    }
  }
  std::copy(x + 2 * half, x + D, y + 2 * half);
}

// dx += R^T g: the gradient of y = R x sent back to x (R is the scaled rotation, so R^T is
// the opposite angle at the same scale); the tail's gradient passes through.
template <typename C>
inline void rotate_back_add(const C* __restrict g, const C* __restrict c, const C* __restrict s,
                            int64_t half, bool interleaved, int64_t D, C* __restrict dx) {
  if (interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      const C g0 = g[2 * i], g1 = g[2 * i + 1];
      dx[2 * i] += g0 * c[i] + g1 * s[i];
      dx[2 * i + 1] += g1 * c[i] - g0 * s[i];
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const C g0 = g[i], g1 = g[i + half];
      dx[i] += g0 * c[i] + g1 * s[i];
      dx[i + half] += g1 * c[i] - g0 * s[i];
    }
  }
  for (int64_t d = 2 * half; d < D; ++d) dx[d] += g[d];
}

// Rows [0, rows) of x (row stride ldx) rotated by table rows [row0, row0 + rows) into y (row
// stride D).
template <typename C>
inline void rotate_rows(const C* x, int64_t ldx, int64_t rows, const RotTable<C>& t,
                        int64_t row0, bool interleaved, int64_t D, C* y) {
  for (int64_t r = 0; r < rows; ++r) {
    rotate_row<C>(x + r * ldx, t.cos(row0 + r), t.sin(row0 + r), t.half, interleaved, D, y + r * D);
  }
}

// dx rows (row stride ldx) += R^T of g rows (row stride ldg), table rows from row0.
template <typename C>
inline void rotate_back_rows(const C* g, int64_t ldg, int64_t rows, const RotTable<C>& t,
                             int64_t row0, bool interleaved, int64_t D, C* dx, int64_t ldx) {
  for (int64_t r = 0; r < rows; ++r) {
    rotate_back_add<C>(g + r * ldg, t.cos(row0 + r), t.sin(row0 + r), t.half, interleaved, D,
                       dx + r * ldx);
  }
}

}  // namespace longattn::cpu
