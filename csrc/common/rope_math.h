// RoPE angle math shared by the CPU and CUDA kernels: the angle positions * inv_freq reduced
// mod pi/2 without losing the low bits, and sin/cos of the reduced angle.
//
// Why not `sincosf(float(pos) * inv_freq)` as most implementations do: at position 1e6 the fp32
// product alone is off by up to ~0.03 rad, and fp32 sin/cos of a large argument add more. Here
// the product is formed exactly in double (pos split so that each part times a 24-bit inv_freq
// fits in 53 bits), each part is reduced by a two-term pi/2 with fma, and only the reduced
// angle (|r| <= pi/4) is rounded to the compute type. For an fp32 inv_freq the result is the
// exact angle's sin/cos up to a few ulps of the compute type for every |pos| < 2^53.
//
// Everything is branch-free per frequency so the CPU loop over frequencies vectorizes; the one
// branch (small vs. large position) is per token. No torch headers here.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace longattn::rope {

// pi/2 = kPio2Hi + kPio2Lo to ~107 bits; 2/pi rounded (only used to pick the quadrant).
constexpr double kPio2Hi = 0x1.921fb54442d18p+0;
constexpr double kPio2Lo = 0x1.1a62633145c07p-54;
constexpr double kTwoOverPi = 0.6366197723675814;

// Below this |pos|, pos * inv_freq (24-bit mantissa) is exact in one double.
constexpr int64_t kExactSinglePart = int64_t(1) << 29;

LONGATTN_HD double rint_hd(double x) {
#if defined(__CUDA_ARCH__)
  return ::rint(x);
#else
  return std::rint(x);
#endif
}

LONGATTN_HD double fma_hd(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// n mod 4 in [0, 4) for an integral n. rint, not floor: GCC vectorizes rint but not floor.
LONGATTN_HD double mod4(double n) {
  const double m = n - 4.0 * rint_hd(n * 0.25);  // in [-2, 2]
  return m < 0.0 ? m + 4.0 : m;
}

// a = n * pi/2 + r with |r| <= ~pi/4; returns r, and n mod 4 in [0, 4) (as a double, so the
// caller's vector loop stays in one register type). a must be below 2^53 * pi/2 in magnitude.
LONGATTN_HD double reduce_pio2(double a, double* quadrant) {
  const double n = rint_hd(a * kTwoOverPi);
  // fma forms a - n * kPio2Hi exactly before rounding; the result is small, so it is accurate.
  double r = fma_hd(-n, kPio2Hi, a);
  r = fma_hd(-n, kPio2Lo, r);
  *quadrant = mod4(n);
  return r;
}

LONGATTN_HD bool is_big_position(int64_t pos) {
  return pos >= kExactSinglePart || pos <= -kExactSinglePart;
}

// The angle pos * inv_freq reduced mod pi/2: r (|r| <= ~pi/4) and the quadrant in {0,1,2,3}.
// Big (is_big_position): split pos = hi + lo, lo = pos mod 2^24, so both hi * f and lo * f are
// exact for an fp32 f (hi has <= 29 significant bits for |pos| < 2^53). A template parameter,
// not a runtime flag, so the CPU's per-token loop over frequencies has no branch.
template <bool Big>
LONGATTN_HD double reduced_angle(int64_t pos, double inv_freq, double* quadrant) {
  if constexpr (!Big) {
    return reduce_pio2(static_cast<double>(pos) * inv_freq, quadrant);
  } else {
    const int64_t lo = pos & ((int64_t(1) << 24) - 1);
    double q_hi, q_lo, q_sum;
    const double r_hi = reduce_pio2(static_cast<double>(pos - lo) * inv_freq, &q_hi);
    const double r_lo = reduce_pio2(static_cast<double>(lo) * inv_freq, &q_lo);
    const double r = reduce_pio2(r_hi + r_lo, &q_sum);  // |r_hi + r_lo| <= pi/2: n in {-1, 0, 1}
    *quadrant = mod4(q_hi + q_lo + q_sum);
    return r;
  }
}

// sin and cos on |y| <= ~pi/4 by their Taylor series, truncated where the next term is below
// half an ulp of the type: through y^15 / y^16 for double, y^9 / y^10 for float.
template <typename T>
struct SinCosPoly;

template <>
struct SinCosPoly<double> {
  LONGATTN_HD static void eval(double y, double* s, double* c) {
    const double z = y * y;
    double ps = -1.0 / 1307674368000.0;                  // -1/15!
    ps = ps * z + 1.0 / 6227020800.0;                    //  1/13!
    ps = ps * z - 1.0 / 39916800.0;                      // -1/11!
    ps = ps * z + 1.0 / 362880.0;                        //  1/9!
    ps = ps * z - 1.0 / 5040.0;                          // -1/7!
    ps = ps * z + 1.0 / 120.0;                           //  1/5!
    ps = ps * z - 1.0 / 6.0;                             // -1/3!
    *s = y + y * z * ps;
    double pc = 1.0 / 20922789888000.0;                  //  1/16!
    pc = pc * z - 1.0 / 87178291200.0;                   // -1/14!
    pc = pc * z + 1.0 / 479001600.0;                     //  1/12!
    pc = pc * z - 1.0 / 3628800.0;                       // -1/10!
    pc = pc * z + 1.0 / 40320.0;                         //  1/8!
    pc = pc * z - 1.0 / 720.0;                           // -1/6!
    pc = pc * z + 1.0 / 24.0;                            //  1/4!
    *c = 1.0 - 0.5 * z + z * z * pc;
  }
};

template <>
struct SinCosPoly<float> {
  LONGATTN_HD static void eval(float y, float* s, float* c) {
    const float z = y * y;
    float ps = 1.0f / 362880.0f;
    ps = ps * z - 1.0f / 5040.0f;
    ps = ps * z + 1.0f / 120.0f;
    ps = ps * z - 1.0f / 6.0f;
    *s = y + y * z * ps;
    float pc = -1.0f / 3628800.0f;
    pc = pc * z + 1.0f / 40320.0f;
    pc = pc * z - 1.0f / 720.0f;
    pc = pc * z + 1.0f / 24.0f;
    *c = 1.0f - 0.5f * z + z * z * pc;
  }
};

// sin and cos of (quadrant * pi/2 + r), computed in T (float or double).
template <typename T>
LONGATTN_HD void sincos_quadrant(double r, double quadrant, T* s, T* c) {
  T s0, c0;
  SinCosPoly<T>::eval(static_cast<T>(r), &s0, &c0);
  // quadrant 0: (s, c); 1: (c, -s); 2: (-s, -c); 3: (-c, s). Selects, not a switch, so
  // the loop over frequencies stays vectorizable.
  const bool odd = quadrant == 1.0 || quadrant == 3.0;
  const T ss = odd ? c0 : s0;
  const T cc = odd ? s0 : c0;
  *s = (quadrant >= 2.0) ? -ss : ss;
  *c = (quadrant == 1.0 || quadrant == 2.0) ? -cc : cc;
}

// cos and sin of pos * inv_freq (the exact product), in T.
template <typename T>
LONGATTN_HD void rope_sincos(int64_t pos, double inv_freq, T* s, T* c) {
  double quadrant;
  const double r = is_big_position(pos) ? reduced_angle<true>(pos, inv_freq, &quadrant)
                                        : reduced_angle<false>(pos, inv_freq, &quadrant);
  sincos_quadrant<T>(r, quadrant, s, c);
}

// One pair (x0, x1) rotated by the angle with cosine c and sine s (already scaled).
template <typename T>
LONGATTN_HD void rotate_pair(T x0, T x1, T c, T s, T* y0, T* y1) {
  *y0 = x0 * c - x1 * s;
  *y1 = x1 * c + x0 * s;
}

}  // namespace longattn::rope
