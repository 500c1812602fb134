// KV-cache index and mask math shared by the CPU and CUDA decode/compaction kernels. No
// torch includes (see host_device.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "common/mask.h"

namespace longattn::kv {

// Keys are split into fixed chunks (flash-decoding); fixed so results never depend on the
// thread count.
constexpr int64_t kDecodeChunk = 256;

// Is cached key `slot` (absolute position kpos) visible to a new query at position qpos?
// Attention's mask (common/mask.h: causal, window `window` to the left, -1 unbounded), except
// that the sinks are the first `sinks` *slots* (still causally): a compacted cache keeps its
// sink keys in front whatever their positions. has_qpos == false: every valid slot is visible.
LONGATTN_HD bool decode_visible(int64_t slot, int64_t kpos, bool has_qpos, int64_t qpos,
                                int64_t window, int64_t sinks) {
  if (!has_qpos) return true;
  MaskParams m;
  m.causal = true;
  m.left = window < 0 ? kUnbounded : window;
  return m.visible(qpos, kpos) || (slot < sinks && kpos <= qpos);
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

}  // namespace longattn::kv
