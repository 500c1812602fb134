// Vectorized row primitives of the CPU softmax, on top of at::vec (AVX2/AVX-512 as built).
// float rows use at::vec; double rows (the gradcheck path) use plain loops, since at::vec's
// double transcendentals live in Sleef, which torch does not export to extensions.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/scores.h"
#include "common/softmax_row.h"

namespace longattn::cpu {

using fVec = at::vec::Vectorized<float>;

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// The row's max; NaN when any entry is NaN (at::vec::maximum propagates it, max_nan too).
template <typename T>
inline T row_max(const T* x, int64_t n) {
  T m = neg_inf<T>();
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (n >= fVec::size()) {
      fVec vm(neg_inf<float>());
      for (; j + fVec::size() <= n; j += fVec::size()) vm = at::vec::maximum(vm, fVec::loadu(x + j));
      float tmp[fVec::size()];
      vm.store(tmp);
      for (int t = 0; t < fVec::size(); ++t) m = max_nan(m, tmp[t]);
    }
  }
  for (; j < n; ++j) m = max_nan(m, x[j]);
  return m;
}

// Whether any of rows x[0..rows) (row stride ld, D values each) holds a NaN or an infinity.
template <typename T>
inline bool any_nonfinite(const T* x, int64_t ld, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * ld;
    T acc = 0;  // x * 0 is NaN exactly for NaN and +-inf
    for (int64_t d = 0; d < D; ++d) acc += row[d] * T(0);
    if (acc != acc) return true;
  }
  return false;
}

// at::vec's fast exp of a NaN is not NaN: the NaN is put back, so that exp(inf - inf) (an
// infinite logit against the row's infinite max) or a NaN lse makes the row NaN, as the dense
// softmax does (common/softmax_row.h), in the vector path as in the scalar one.
inline fVec exp_keep_nan(const fVec& a) { return fVec::blendv(a.exp_u20(), a, a.isnan()); }

// x[j] = exp(x[j] * mul - sub); returns the sum. x[j] = -inf gives 0.
template <typename T>
inline T exp_sum(T* x, int64_t n, T mul, T sub) {
  T sum = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    const fVec vmul(mul), vsub(sub);
    fVec vsum(0.f);
    for (; j + fVec::size() <= n; j += fVec::size()) {
      fVec e = exp_keep_nan(at::vec::fmsub(fVec::loadu(x + j), vmul, vsub));
      e.store(x + j);
      vsum = vsum + e;
    }
    float tmp[fVec::size()];
    vsum.store(tmp);
    for (int t = 0; t < fVec::size(); ++t) sum += tmp[t];
  }
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] * mul - sub);
    sum += x[j];
  }
  return sum;
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    const fVec va(a);
    for (; j + fVec::size() <= n; j += fVec::size()) (fVec::loadu(x + j) * va).store(x + j);
  }
  for (; j < n; ++j) x[j] *= a;
}

// x[j] = softcap_logit(x[j], scale / cap, cap) (common/scores.h). The float vector path spells
// tanh as 1 - 2 / (exp(2y) + 1) like the scalar definition, with at::vec's exp (no clamp
// needed: that exp saturates, giving exactly +-1 at the ends). cpu/checks.h exposes both to
// the tests.
template <typename T>
inline void softcap_row(T* x, int64_t n, T scale, T cap) {
  const T inv = scale / cap;
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    const fVec vinv(2.f * inv), vcap(cap), one(1.f), two(2.f);
    for (; j + fVec::size() <= n; j += fVec::size()) {
      const fVec e = exp_keep_nan(fVec::loadu(x + j) * vinv);
      (vcap * (one - two / (e + one))).store(x + j);
    }
  }
  for (; j < n; ++j) x[j] = softcap_logit(x[j], inv, cap);
}

}  // namespace longattn::cpu
