// Row kernels of the CPU RoPE backward that also gives the inv_freq gradient: one head's
// incoming gradient g is rotated back (stored to dx; the caller passes a scratch row when the
// input gradient is not wanted, so both cases run the same code and give the same bits) and,
// per pair i,
// x_a dx_b - x_b dx_a is added to `acc` (x: the forward's input), from dx before it is rounded
// to T. That cross product is d loss / d angle of the pair up to the sign of the forward's
// rotation: d/dtheta (R(theta) x) = R(theta) J x with J the quarter turn, so
// g . (A R(theta) J x) = (A R(-theta) g) . (J x) = dx . (-x_b, x_a).
//
// acc layout: NeoX: acc[i] per pair. Interleaved: acc[e] per element e < R holds the sum of
// x[e] * dx[e ^ 1], so pair i's value is acc[2i] - acc[2i+1] (pair_cross); this keeps the vector
// path to one multiply-add per element (swap_pairs, as the forward's interleaved rows).
#pragma once
#include "cpu/rope_rows.h"

namespace longattn::cpu::rope_rows {

template <typename C>
inline C pair_cross(const C* acc, int64_t i, bool interleaved) {
  return interleaved ? acc[2 * i] - acc[2 * i + 1] : acc[i];
}

// ---- scratch path (fp64, builds without AVX2/AVX-512) -----------------------------------

// scratch: 3 * R values of C.
template <typename T, typename C>
void grad_row_scratch(const T* g, const T* x, T* dx, const Tables<C>& t, int64_t R,
                      bool interleaved, C* __restrict acc, C* scratch) {
  const int64_t half = R / 2;
  C* __restrict gr = scratch;
  C* __restrict xr = scratch + R;
  C* __restrict dr = scratch + 2 * R;
  to_compute<T, C>(g, gr, R);
  to_compute<T, C>(x, xr, R);
  if (interleaved) {
    interleaved_loop<C>(gr, t.cos, t.sin, dr, half);
    for (int64_t e = 0; e < R; ++e) acc[e] += xr[e] * dr[e ^ 1];
  } else {
    neox_loop<C>(gr, t.cos, t.sin, dr, half);
    for (int64_t i = 0; i < half; ++i) acc[i] += xr[i] * dr[i + half] - xr[i + half] * dr[i];
  }
  from_compute<T, C>(dr, dx, R);
}

// ---- vector path -----------------------------------------------------------------------

template <typename T>
void grad_row_vec(const T* g, const T* x, T* dx, const Tables<float>& t, int64_t R,
                  bool interleaved, float* acc) {
  const int64_t half = R / 2;
  const int64_t F = fVec::size();
  int64_t done = 0;
  if (interleaved) {
    for (; done + kStep <= R; done += kStep) {
      fVec ga, gb, xa, xb;
      load2<T>(g + done, ga, gb);
      load2<T>(x + done, xa, xb);
      const fVec da = ga * fVec::loadu(t.cos2 + done) + swap_pairs(ga) * fVec::loadu(t.sin2 + done);
      const fVec db = gb * fVec::loadu(t.cos2 + done + F) + swap_pairs(gb) * fVec::loadu(t.sin2 + done + F);
      store2<T>(dx + done, da, db);
      (fVec::loadu(acc + done) + xa * swap_pairs(da)).store(acc + done);
      (fVec::loadu(acc + done + F) + xb * swap_pairs(db)).store(acc + done + F);
    }
    for (int64_t i = done / 2; i < half; ++i) {
      const float g0 = static_cast<float>(g[2 * i]), g1 = static_cast<float>(g[2 * i + 1]);
      const float d0 = g0 * t.cos[i] - g1 * t.sin[i], d1 = g1 * t.cos[i] + g0 * t.sin[i];
      acc[2 * i] += static_cast<float>(x[2 * i]) * d1;
      acc[2 * i + 1] += static_cast<float>(x[2 * i + 1]) * d0;
      dx[2 * i] = static_cast<T>(d0);
      dx[2 * i + 1] = static_cast<T>(d1);
    }
    return;
  }
  for (; done + kStep <= half; done += kStep) {
    fVec g0a, g0b, g1a, g1b, x0a, x0b, x1a, x1b;
    load2<T>(g + done, g0a, g0b);
    load2<T>(g + half + done, g1a, g1b);
    load2<T>(x + done, x0a, x0b);
    load2<T>(x + half + done, x1a, x1b);
    const fVec ca = fVec::loadu(t.cos + done), cb = fVec::loadu(t.cos + done + F);
    const fVec sa = fVec::loadu(t.sin + done), sb = fVec::loadu(t.sin + done + F);
    const fVec d0a = g0a * ca - g1a * sa, d0b = g0b * cb - g1b * sb;
    const fVec d1a = g1a * ca + g0a * sa, d1b = g1b * cb + g0b * sb;
    store2<T>(dx + done, d0a, d0b);
    store2<T>(dx + half + done, d1a, d1b);
    (fVec::loadu(acc + done) + (x0a * d1a - x1a * d0a)).store(acc + done);
    (fVec::loadu(acc + done + F) + (x0b * d1b - x1b * d0b)).store(acc + done + F);
  }
  for (int64_t i = done; i < half; ++i) {
    const float g0 = static_cast<float>(g[i]), g1 = static_cast<float>(g[i + half]);
    const float d0 = g0 * t.cos[i] - g1 * t.sin[i], d1 = g1 * t.cos[i] + g0 * t.sin[i];
    acc[i] += static_cast<float>(x[i]) * d1 - static_cast<float>(x[i + half]) * d0;
    dx[i] = static_cast<T>(d0);
    dx[i + half] = static_cast<T>(d1);
  }
}

template <typename T, typename C>
void grad_row(const T* g, const T* x, T* dx, const Tables<C>& t, int64_t R, bool interleaved,
              C* acc, C* scratch) {
  if constexpr (kVectorRows && std::is_same_v<C, float>) {
    grad_row_vec<T>(g, x, dx, t, R, interleaved, acc);
  } else {
    grad_row_scratch<T, C>(g, x, dx, t, R, interleaved, acc, scratch);
  }
}

}  // namespace longattn::cpu::rope_rows
