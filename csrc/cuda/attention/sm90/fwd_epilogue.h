// The Hopper forward's epilogue: the normalized O rows straight from registers to global memory
// (each thread's column pairs as 4-byte stores) and the fp32 lse of each row, by the lane of
// the quad that holds the row's first column pair. Rows past the sequence are not stored.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/array.h>

#include "cuda/attention/sm90/fwd_args.h"

namespace longattn::cuda::sm90 {

template <class Tr, class Out, class OutCoords, int kRows, class RowCoords>
__device__ __forceinline__ void store_output(const AttentionParams& p, const QueryTile<Tr>& w,
                                             const Out& o, const OutCoords& co,
                                             const float (&lse)[kRows], const RowCoords& cs) {
  using namespace cute;
  using Element = typename Tr::Element;
  using Pair = cutlass::AlignedArray<Element, 2>;
  static_assert(decltype(size<0>(o))::value == kRows);

  if (get<1>(cs(0, 0)) == 0) {
    float* lse_ptr = static_cast<float*>(p.lse) + lse_offset(p, w.si, w.b, w.h) + w.i0;
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      const int r = get<0>(cs(mi, 0));
      if (r < w.nq) lse_ptr[r] = lse[mi];
    }
  }

  const int64_t row_stride = p.heads_q * Tr::kHeadDim;
  Element* o_ptr = static_cast<Element*>(p.out) + out_offset(p, w.si, w.b, w.h) + w.i0 * row_stride;
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    const int r = get<0>(co(mi, 0));
    if (r >= w.nq) continue;
    Element* row = o_ptr + r * row_stride;
    // Columns (nj, nj + 1) are the accumulator's column pair: adjacent in memory.
#pragma unroll
    for (int nj = 0; nj < size<1>(o); nj += 2) {
      Pair v;
      v[0] = static_cast<Element>(o(mi, nj));
      v[1] = static_cast<Element>(o(mi, nj + 1));
      *reinterpret_cast<Pair*>(row + get<1>(co(mi, nj))) = v;
    }
  }
}

}  // namespace longattn::cuda::sm90
