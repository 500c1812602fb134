// The log-sum-exp merge of partial attentions over disjoint key sets, one row at a time.
// Shared by the CPU and CUDA merge kernels (merge_attention, and merge_attention_, the running
// form ring attention accumulates its hops with).
// An lse of -inf (a partial that saw no key) gets weight 0; if every partial is -inf the
// merged row is out = 0, lse = -inf, never NaN. A NaN lse makes the merged row NaN
// (common/softmax_row.h's rule), as the dense log-sum-exp would.
#pragma once
#include <cmath>

#include "common/host_device.h"
#include "common/softmax_row.h"

namespace longattn {

// The weight of a partial with log-sum-exp lse_i in a merge whose largest lse is mx and whose
// sum of exp(lse - mx) is 1 / inv_sum: exp(lse_i - mx) * inv_sum, 0 for a partial that saw no
// key. Kernels that reduce mx and the sum in parallel (decode's combine) use it directly.
template <typename A>
LONGATTN_HD A partial_weight(A lse_i, A mx, A inv_sum) {
  return lse_i == A(-INFINITY) ? A(0) : static_cast<A>(::exp(lse_i - mx)) * inv_sum;
}

// weights[i] = exp(lse[i] - merged) for n partials; returns the merged lse.
template <typename A>
LONGATTN_HD A merge_weights(const A* lse, int n, A* weights) {
  A mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = max_nan(mx, lse[i]);
  if (mx == -INFINITY) {
    for (int i = 0; i < n; ++i) weights[i] = 0;
    return mx;
  }
  A sum = 0;
  for (int i = 0; i < n; ++i) sum += partial_weight(lse[i], mx, A(1));
  const A inv = A(1) / sum;
  for (int i = 0; i < n; ++i) weights[i] = partial_weight(lse[i], mx, inv);
  return mx + ::log(sum);
}

// The running form: a partial with lse_part joins a running row with lse_run. A running row
// still empty (out 0, lse -inf) takes the partial exactly.
template <typename A>
struct RunningMerge {
  A w_run, w_part, lse;

  // One element of the merged row; a zero weight drops its term.
  LONGATTN_HD A apply(A run, A part) const {
    return (w_run == A(0) ? A(0) : w_run * run) + (w_part == A(0) ? A(0) : w_part * part);
  }

  // False when the running row's weight is 0 (it was empty): the kernels then skip reading it
  // (apply ignores it), a third less memory traffic on a row's first partial.
  LONGATTN_HD bool reads_run() const { return w_run != A(0); }
};

// merge_weights on the two, the same operations without the larger side's exp(0) = 1: one exp
// and one log, none at all when a side is -inf (a row's first partial, a partial with no key).
template <typename A>
LONGATTN_HD RunningMerge<A> running_merge(A lse_run, A lse_part) {
  if (lse_part == -INFINITY) return {lse_run == -INFINITY ? A(0) : A(1), A(0), lse_run};
  if (lse_run == -INFINITY) return {A(0), A(1), lse_part};
  const bool run_larger = lse_run >= lse_part;
  const A mx = run_larger ? lse_run : lse_part;
  const A e = ::exp((run_larger ? lse_part : lse_run) - mx);
  const A sum = A(1) + e;
  const A lse = mx + ::log(sum);
  return run_larger ? RunningMerge<A>{A(1) / sum, e / sum, lse}
                    : RunningMerge<A>{e / sum, A(1) / sum, lse};
}

}  // namespace longattn
