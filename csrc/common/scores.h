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
