// Online softmax of the forward kernel, one thread's rows: running max and partial sum per
// row, the rescale of the output accumulator when the max grows, and the final
// normalization with the learned sink logit, lse, the fully-masked-row rule and the
// non-finite rules of docs/semantics.md (common/softmax_row.h).
//
// Scores arrive in "score units": raw q.k when the logits are plain (the row scale is folded
// into the exponent: logit = x * row_scale) or finished logits otherwise (unit 1).
#pragma once
#include <cute/tensor.hpp>

#include "common/softmax_row.h"
#include "cuda/attention/flash/mma_utils.h"
#include "cuda/attention/flash/score_tile.h"

namespace longattn::cuda::flash {

// Ops: the instruction policy (device_ops.h) for the quad shuffles.
template <int kRows, class Ops>
struct OnlineSoftmax {
  float row_max[kRows];  // running max in score units, -inf while nothing is visible
  float row_sum[kRows];  // this lane's share of sum exp(logit - max); quad-reduced at the end
  // Score units per row: the row scale (float(scale * logn(p))) when plain, else 1. Passed in
  // rather than stored, so the scales are held once.
  const float (&row_scale)[kRows];
  const bool plain;

  __device__ __forceinline__ OnlineSoftmax(const float (&scales)[kRows], bool plain_logits)
      : row_scale(scales), plain(plain_logits) {
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      row_max[mi] = -INFINITY;
      row_sum[mi] = 0.f;
    }
  }

  // logit = score * unit(mi)
  __device__ __forceinline__ float unit(int mi) const { return plain ? row_scale[mi] : 1.f; }

  // Scores of one key tile (masked entries -inf) become probabilities exp(logit - max) in
  // place; rows of the output accumulator are rescaled to the new max.
  template <class Scores, class Out>
  __device__ __forceinline__ void update(Scores& s, Out& o) {
    using namespace cute;
    static_assert(decltype(size<0>(s))::value == kRows);
    static_assert(decltype(size<0>(o))::value == kRows);
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      float mx = row_max[mi];
#pragma unroll
      for (int ni = 0; ni < size<1>(s); ++ni) mx = fmaxf(mx, s(mi, ni));
      mx = quad_max<Ops>(mx);
      const float u = unit(mi) * kLog2e;
      // A row with nothing visible yet keeps max -inf and contributes zeros (exp2(-inf) = 0).
      const float alpha = row_max[mi] == -INFINITY ? 0.f : exp2f((row_max[mi] - mx) * u);
      const float shift = mx == -INFINITY ? 0.f : mx * u;
      row_max[mi] = mx;
      float sum = 0.f;
#pragma unroll
      for (int ni = 0; ni < size<1>(s); ++ni) {
        const float e = exp2f(s(mi, ni) * u - shift);
        s(mi, ni) = e;
        sum += e;
      }
      row_sum[mi] = row_sum[mi] * alpha + sum;
#pragma unroll
      for (int nj = 0; nj < size<1>(o); ++nj) o(mi, nj) *= alpha;
    }
  }

  // Normalizes the output rows and returns each row's natural-log lse, by the row rules of
  // common/softmax_row.h. sink: the head's learned sink logit (has_sink); sees_keys(mi): whether
  // the mask gives row mi any key, asked only of rows whose max stayed -inf.
  template <class Out, class SeesKeys>
  __device__ __forceinline__ void finish(Out& o, bool has_sink, float sink, float (&lse)[kRows],
                                         const SeesKeys& sees_keys) {
    using namespace cute;
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      const float l = quad_sum<Ops>(row_sum[mi]);
      // update's fmaxf drops a NaN logit from the max, but the NaN reaches the sum (exp2 of NaN,
      // or inf - inf below an infinite max): a NaN sum is the NaN-keeping max of the row rules.
      const bool no_max = row_max[mi] == -INFINITY;
      const float m = l != l ? NAN : no_max ? -INFINITY : row_max[mi] * unit(mi);
      const RowFinish<float> f = finish_softmax_row<float>(m, l, has_sink, sink, no_max && sees_keys(mi));
      lse[mi] = f.lse;
      // A zero scale gives zeros, not o * 0, which a NaN in o would survive (as the CPU kernel).
      const float scale = f.out_scale;
#pragma unroll
      for (int nj = 0; nj < size<1>(o); ++nj) o(mi, nj) = scale == 0.f ? 0.f : o(mi, nj) * scale;
    }
  }
};

}  // namespace longattn::cuda::flash
