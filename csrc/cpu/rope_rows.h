// Row kernels of the CPU RoPE: rotate the first R features of one head from `in` to `out`
// (the same memory when in place) with one token's cos/sin tables.
//
// fp32/bf16/fp16 rows go through at::vec registers in steps of two float vectors (the width of
// one bf16 vector), loading a whole step before storing it so in place is safe; leftovers of a
// row that is not a multiple of the step use scalar code. fp64 rows (the gradcheck path) and
// builds without AVX2/AVX-512 use plain loops over a scratch copy of the row, which GCC
// vectorizes because the scratch cannot alias the output.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <ATen/Dispatch.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/rope_math.h"
#include "common/rope_params.h"

// The dtypes of the rope ops (checked by rope_args.cpp).
#define LONGATTN_ROPE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace longattn::cpu::rope_rows {

// Rows are rotated in fp32, fp64 for fp64 inputs.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline std::vector<double> frequencies(const RopeParams& p) {
  std::vector<double> freq(p.rotary_dim / 2);
  for (int64_t i = 0; i < p.rotary_dim / 2; ++i) freq[i] = p.frequency(i);
  return freq;
}

// cos/sin per pair (half entries); for the interleaved layout also per element (R entries),
// with sin2 carrying the sign: y[2i] = x[2i] c - x[2i+1] s, y[2i+1] = x[2i+1] c + x[2i] s,
// i.e. y = x * cos2 + swap_pairs(x) * sin2 with sin2 = (-s, +s, ...).
template <typename C>
struct Tables {
  C* cos;
  C* sin;
  C* cos2;
  C* sin2;
};

// cos/sin of pos * f[i] for i < half, times the scaling (sin negated for the inverse).
template <bool Big, typename C>
void fill_table(int64_t pos, const double* __restrict f, int64_t half, C cos_mul, C sin_mul,
                C* __restrict cos_t, C* __restrict sin_t) {
  for (int64_t i = 0; i < half; ++i) {
    double quadrant;
    const double r = rope::reduced_angle<Big>(pos, f[i], &quadrant);
    C s, c;
    rope::sincos_quadrant<C>(r, quadrant, &s, &c);
    cos_t[i] = c * cos_mul;
    sin_t[i] = s * sin_mul;
  }
}

template <typename C>
void expand_interleaved(Tables<C>& t, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    t.cos2[2 * i] = t.cos2[2 * i + 1] = t.cos[i];
    t.sin2[2 * i] = -t.sin[i];
    t.sin2[2 * i + 1] = t.sin[i];
  }
}

// The tables of one position: fill_table (the exact angle path picked per position), then the
// per-element tables when the pairs are interleaved.
template <typename C>
void position_tables(int64_t pos, const double* f, int64_t half, C cos_mul, C sin_mul,
                     bool interleaved, Tables<C>& t) {
  if (rope::is_big_position(pos)) {
    fill_table<true, C>(pos, f, half, cos_mul, sin_mul, t.cos, t.sin);
  } else {
    fill_table<false, C>(pos, f, half, cos_mul, sin_mul, t.cos, t.sin);
  }
  if (interleaved) expand_interleaved<C>(t, half);
}

// ---- scratch path ----------------------------------------------------------------------

template <typename T, typename C>
void to_compute(const T* src, C* dst, int64_t n) {
  if constexpr (std::is_same_v<T, C>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<C>(src[i]);
  }
}

template <typename T, typename C>
void from_compute(const C* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, C>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

template <typename C>
void neox_loop(const C* __restrict x, const C* __restrict c, const C* __restrict s,
               C* __restrict y, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const C x0 = x[i], x1 = x[i + half];
    y[i] = x0 * c[i] - x1 * s[i];
    y[i + half] = x1 * c[i] + x0 * s[i];
  }
}

template <typename C>
void interleaved_loop(const C* __restrict x, const C* __restrict c, const C* __restrict s,
                      C* __restrict y, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const C x0 = x[2 * i], x1 = x[2 * i + 1];
    y[2 * i] = x0 * c[i] - x1 * s[i];
    y[2 * i + 1] = x1 * c[i] + x0 * s[i];
  }
}

// scratch: 2 * R values of C.
template <typename T, typename C>
void rotate_row_scratch(const T* in, T* out, const Tables<C>& t, int64_t R, bool interleaved,
                        C* scratch) {
  C* xr = scratch;
  C* yr = scratch + R;
  to_compute<T, C>(in, xr, R);
  if (interleaved) {
    interleaved_loop<C>(xr, t.cos, t.sin, yr, R / 2);
  } else {
    neox_loop<C>(xr, t.cos, t.sin, yr, R / 2);
  }
  from_compute<T, C>(yr, out, R);
}

// ---- vector path -----------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kVectorRows = true;
#else
constexpr bool kVectorRows = false;
#endif

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kStep = 2 * fVec::size();  // floats per step: one bf16/fp16 vector

template <typename T>
inline void load2(const T* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + fVec::size());
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + fVec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// (v0, v1, v2, v3, ...) -> (v1, v0, v3, v2, ...)
inline fVec swap_pairs(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_permute_ps(v, 0xB1);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_permute_ps(v, 0xB1);
#else
  return v;  // unused: kVectorRows is false
#endif
}

template <typename T>
void rotate_row_vec(const T* in, T* out, const Tables<float>& t, int64_t R, bool interleaved) {
  const int64_t half = R / 2;
  const int64_t F = fVec::size();
  int64_t done = 0;  // pairs (NeoX) or elements (interleaved) handled by vectors
  if (interleaved) {
    for (; done + kStep <= R; done += kStep) {
      fVec a, b;
      load2<T>(in + done, a, b);
      const fVec ya = a * fVec::loadu(t.cos2 + done) + swap_pairs(a) * fVec::loadu(t.sin2 + done);
      const fVec yb = b * fVec::loadu(t.cos2 + done + F) + swap_pairs(b) * fVec::loadu(t.sin2 + done + F);
      store2<T>(out + done, ya, yb);
    }
    for (int64_t i = done / 2; i < half; ++i) {
      const float x0 = static_cast<float>(in[2 * i]), x1 = static_cast<float>(in[2 * i + 1]);
      out[2 * i] = static_cast<T>(x0 * t.cos[i] - x1 * t.sin[i]);
      out[2 * i + 1] = static_cast<T>(x1 * t.cos[i] + x0 * t.sin[i]);
    }
    return;
  }
  for (; done + kStep <= half; done += kStep) {
    fVec x0a, x0b, x1a, x1b;
    load2<T>(in + done, x0a, x0b);
    load2<T>(in + half + done, x1a, x1b);
    const fVec ca = fVec::loadu(t.cos + done), cb = fVec::loadu(t.cos + done + F);
    const fVec sa = fVec::loadu(t.sin + done), sb = fVec::loadu(t.sin + done + F);
    store2<T>(out + done, x0a * ca - x1a * sa, x0b * cb - x1b * sb);
    store2<T>(out + half + done, x1a * ca + x0a * sa, x1b * cb + x0b * sb);
  }
  for (int64_t i = done; i < half; ++i) {
    const float x0 = static_cast<float>(in[i]), x1 = static_cast<float>(in[i + half]);
    out[i] = static_cast<T>(x0 * t.cos[i] - x1 * t.sin[i]);
    out[i + half] = static_cast<T>(x1 * t.cos[i] + x0 * t.sin[i]);
  }
}

template <typename T, typename C>
void rotate_row(const T* in, T* out, const Tables<C>& t, int64_t R, bool interleaved, C* scratch) {
  if constexpr (kVectorRows && std::is_same_v<C, float>) {
    rotate_row_vec<T>(in, out, t, R, interleaved);
  } else {
    rotate_row_scratch<T, C>(in, out, t, R, interleaved, scratch);
  }
}

}  // namespace longattn::cpu::rope_rows
