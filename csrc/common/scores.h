// How a raw dot product q.k becomes a logit: scale (with log-n scaling by query position),
// softcap, ALiBi bias; and the learned sink logit's place in the softmax. One definition for
// the CPU and CUDA kernels. The order matches docs/semantics.md.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace longattn {

// log-n ("entropy invariance") query scaling: max(1, ln(p + 1) / ln(base)); base <= 1 or a
// position below 1 leaves the query unscaled.
LONGATTN_HD double logn_factor(int64_t p, double inv_log_base) {
  if (inv_log_base <= 0.0 || p < 1) return 1.0;
  const double f = ::log(static_cast<double>(p) + 1.0) * inv_log_base;
  return f > 1.0 ? f : 1.0;
}

// ALiBi bias for query position p and key position s.
LONGATTN_HD float alibi_bias(float slope, int64_t p, int64_t s) {
  const int64_t d = p >= s ? p - s : s - p;
  return -slope * static_cast<float>(d);
}

constexpr float kLog2e = 1.4426950408889634f;

// The logit soft cap x -> cap * tanh(x / cap): one definition for the CPU kernels (scalar
// path; the vector path in cpu/vec_math.h uses the same form and is tested against this one),
// the SIMT kernels and the flash forward and backward.
//
// fp32 spells tanh through exp2: tanhf compiles to tanh.approx (2^-11 relative) under nvcc
// --use_fast_math, and the flash backward's P would then disagree with the forward's lse by up
// to ~0.5% of a logit of softcap size. This form is accurate to ~1e-7 absolute with the fast
// exp2 and saturates exactly: tanh(y) = 1 - 2 / (exp(2y) + 1), |y| <= 20 keeps exp2 finite, and
// tanh(20) is 1 in fp32. fp64 (the gradcheck path) uses the accurate tanh.
LONGATTN_HD float softcap_tanh(float y) {
  if (y != y) return y;  // fmaxf would turn a NaN logit into -20, i.e. a finite one
  const float y2 = fminf(fmaxf(y, -20.f), 20.f) * (2.f * kLog2e);
  return 1.f - 2.f / (exp2f(y2) + 1.f);
}
LONGATTN_HD double softcap_tanh(double y) { return ::tanh(y); }

// cap * tanh(x * inv_cap); inv_cap = row_scale / cap folds the row's softmax scale in.
template <typename A>
LONGATTN_HD A softcap_logit(A x, A inv_cap, A cap) {
  return cap * softcap_tanh(x * inv_cap);
}

// The backward's chain factor through the cap, d(cap * tanh(y)) / d(cap * y) = 1 - tanh(y)^2,
// from tanh(y) (= the capped logit / cap).
template <typename A>
LONGATTN_HD A softcap_derivative(A tanh_y) {
  return A(1) - tanh_y * tanh_y;
}

// Kept in double so the fp64 (gradcheck) path is exact; fp32 kernels round once per row.
struct ScoreParams {
  double scale = 1.0;              // softmax scale, default 1/sqrt(head_dim)
  double softcap = 0.0;            // 0 = off; else x -> softcap * tanh(x / softcap)
  double inv_log_logn_base = 0.0;  // 1 / ln(logn_base), 0 = off
  bool has_alibi = false;
  bool has_sink_logit = false;

  // True when every logit is scale_row * q.k plus nothing else, so the softmax can fold the
  // scale into its exponent and skip a pass over the scores.
  LONGATTN_HD bool plain() const { return softcap == 0.0 && !has_alibi; }
};

}  // namespace longattn
