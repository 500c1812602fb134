// The log-sum-exp merge of partial attentions over disjoint key sets, one row at a time.
// Shared by the CPU and CUDA merge kernels and by ring attention's accumulation.
// An lse of -inf (a partial that saw no key) gets weight 0; if every partial is -inf the
// merged row is out = 0, lse = -inf. No NaN either way.
#pragma once
#include <cmath>

#include "common/host_device.h"

namespace longattn {

// weights[i] = exp(lse[i] - merged) for n partials; returns the merged lse.
template <typename A>
LONGATTN_HD A merge_weights(const A* lse, int n, A* weights) {
  A mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = lse[i] > mx ? lse[i] : mx;
  if (mx == -INFINITY) {
    for (int i = 0; i < n; ++i) weights[i] = 0;
    return mx;
  }
  A sum = 0;
  for (int i = 0; i < n; ++i) {
    weights[i] = lse[i] == -INFINITY ? A(0) : ::exp(lse[i] - mx);
    sum += weights[i];
  }
  for (int i = 0; i < n; ++i) weights[i] /= sum;
  return mx + ::log(sum);
}

}  // namespace longattn
