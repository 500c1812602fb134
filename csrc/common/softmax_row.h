// The rules every attention kernel applies when it finishes a softmax row (CPU, SIMT, flash,
// decode, the split-K merges), in one place. docs/semantics.md states them for users:
//
// - A NaN among a row's visible logits makes the row NaN (out and lse). Running maxima use
//   max_nan, which keeps a NaN where std::max and fmaxf would drop it and leave the row looking
//   fully masked. An infinite logit gives NaN through exp(inf - inf), as in the dense formula.
// - A row with no visible key: out = 0, lse = -inf; with a learned sink logit z: out = 0,
//   lse = z (the sink is the only denominator term and carries no value).
// - A row that has visible keys whose logits are all -inf (only infinite inputs give that) is
//   NaN, as the dense softmax over those keys is; so is its lse, so that the backward, which
//   reads only lse, sends NaN to that row's gradients too.
#pragma once
#include <cmath>

#include "common/host_device.h"

namespace longattn {

// max(a, b) that returns NaN when either is NaN.
template <typename A>
LONGATTN_HD A max_nan(A a, A b) {
  return (a != a || a > b) ? a : b;
}

template <typename A>
struct RowFinish {
  A out_scale;  // multiplies the accumulated sum of exp(logit - m) * v
  A lse;
};

// m: the running max of the row's logits (-inf when no finite logit was seen), l: the sum of
// exp(logit - m) over them; sees_keys: whether the mask gives the row any key.
template <typename A>
LONGATTN_HD RowFinish<A> finish_softmax_row(A m, A l, bool has_sink, A sink_logit,
                                            bool sees_keys) {
  if (m == A(-INFINITY)) {
    if (has_sink) return {A(0), sink_logit};
    return sees_keys ? RowFinish<A>{A(NAN), A(NAN)} : RowFinish<A>{A(0), A(-INFINITY)};
  }
  A keep = A(1);  // rescale of the accumulated output when the sink raises the max
  if (has_sink) {
    // As the dense softmax: a NaN sink makes the row NaN, and so does +inf (inf - inf).
    const A m_new = max_nan(m, sink_logit);
    keep = ::exp(m - m_new);
    l = l * keep + ::exp(sink_logit - m_new);
    m = m_new;
  }
  return {keep / l, m + ::log(l)};
}

}  // namespace longattn
