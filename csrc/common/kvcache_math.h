// KV-cache index and mask math shared by the CPU and CUDA decode/compaction kernels. No
// torch includes (see host_device.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace longattn::kv {

// Keys are split into fixed chunks (flash-decoding); fixed so results never depend on the
// thread count.
constexpr int64_t kDecodeChunk = 256;

// Is cached key `slot` (absolute position kpos) visible to a new query at position qpos?
// Causal on positions (kpos <= qpos); window: qpos - kpos <= window (window < 0: unbounded);
// the first `sinks` slots are visible regardless of the window (still causally).
// has_qpos == false: every valid slot is visible.
LONGATTN_HD bool decode_visible(int64_t slot, int64_t kpos, bool has_qpos, int64_t qpos,
                                int64_t window, int64_t sinks) {
  if (!has_qpos) return true;
  if (kpos > qpos) return false;
  if (window < 0 || slot < sinks) return true;
  return qpos - kpos <= window;
}

// Validate entries [begin, end) of one (batch, head)'s keep list of n indices: strictly
// ascending, within [0, length). Returns -1 when valid, else the first offending position j
// (idx[j] bad). Entry begin - 1 is taken as already checked, so a parallel validator can split
// one list into ranges: the smallest j any range reports is the j a single pass reports.
template <typename I>
LONGATTN_HD int64_t first_bad_keep_in(const I* idx, int64_t stride, int64_t begin, int64_t end,
                                      int64_t length) {
  int64_t prev = begin > 0 ? static_cast<int64_t>(idx[(begin - 1) * stride]) : -1;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t s = static_cast<int64_t>(idx[j * stride]);
    if (s <= prev || s >= length) return j;
    prev = s;
  }
  return -1;
}

// The whole list: n indices.
template <typename I>
LONGATTN_HD int64_t first_bad_keep(const I* idx, int64_t stride, int64_t n, int64_t length) {
  return first_bad_keep_in(idx, stride, 0, n, length);
}

// Merge of partial (out, lse) by log-sum-exp, in fixed chunk order: weight of chunk c.
template <typename C>
LONGATTN_HD C merge_weight(C lse_c, C lse_max, C inv_sum) {
  return lse_c == -INFINITY ? C(0) : static_cast<C>(::exp(lse_c - lse_max)) * inv_sum;
}

}  // namespace longattn::kv
