// The memory-bound kernels around the flash backward: delta before it, the sink-logit
// gradient and the dQ conversion after it. Bodies take explicit block / thread indices so the
// host emulator can run them as well.
#pragma once
#include <cutlass/array.h>

#include <cmath>

#include "cuda/attention/flash/bwd_params.h"
#include "cuda/attention/flash/bwd_utils.h"

namespace longattn::cuda::flash {

// Index of (row r of q / out, q head h) in lse's layout: dense (B, Hq, Lq), varlen (Hq, Tq).
BWD_DEVICE int64_t lse_index(const AttentionParams& p, int64_t r, int64_t h) {
  if (p.varlen()) return h * p.total_q + r;
  return ((r / p.seqlen_q) * p.heads_q + h) * p.seqlen_q + r % p.seqlen_q;
}

// delta = rowsum(dO * O) - dlse for every (row, q head); kThreadsPerRow threads per row (the
// largest power of two dividing the row's 16-byte vectors, at most 32), kVecs vectors of 8
// elements each, summed in a fixed order (the vectors, then a butterfly).
template <class Ops, typename Elem, int kHeadDim>
struct DeltaKernel {
  static constexpr int kThreads = 256;
  static constexpr int kRowVecs = kHeadDim / 8;
  static constexpr int kThreadsPerRow = (kRowVecs & -kRowVecs) < 32 ? (kRowVecs & -kRowVecs) : 32;
  static constexpr int kVecs = kRowVecs / kThreadsPerRow;
  static constexpr int kRowsPerBlock = kThreads / kThreadsPerRow;
  static_assert(kHeadDim % 8 == 0 && kVecs * kThreadsPerRow == kRowVecs);

  static BWD_DEVICE void run(const BwdParams& bp, int64_t block, int tid) {
    const AttentionParams& p = bp.p;
    const int64_t item = block * kRowsPerBlock + tid / kThreadsPerRow;  // row * heads_q + head
    const int lane = tid % kThreadsPerRow;
    const bool valid = item < bp.rows_q * p.heads_q;
    float acc = 0.f;
    if (valid) {
      // out / dout rows are (rows, heads_q, head_dim) contiguous: item * head_dim is the row.
      using Vec = cutlass::AlignedArray<Elem, 8>;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int64_t off = item * kHeadDim + (i * kThreadsPerRow + lane) * 8;
        const Vec o = *reinterpret_cast<const Vec*>(static_cast<const Elem*>(p.out) + off);
        const Vec d = *reinterpret_cast<const Vec*>(static_cast<const Elem*>(bp.dout) + off);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc += static_cast<float>(o[e]) * static_cast<float>(d[e]);
      }
    }
#pragma unroll
    for (int m = kThreadsPerRow / 2; m > 0; m >>= 1) acc += Ops::shfl_xor(acc, m);
    if (valid && lane == 0) {
      const int64_t li = lse_index(p, item / p.heads_q, item % p.heads_q);
      const float l = static_cast<const float*>(p.lse)[li];
      const float dl = bp.dlse ? static_cast<const float*>(bp.dlse)[li] : 0.f;
      // A row without any visible key (lse = -inf) has no gradient at all.
      bp.delta[li] = l == -INFINITY ? 0.f : acc - dl;
    }
  }
};

// d sink_h = -sum over rows of exp(z_h - lse) * delta: one block per q head, a strided sum
// per thread and a tree over the block, both in a fixed order (deterministic).
template <class Ops>
struct DsinkKernel {
  static constexpr int kThreads = 256;

  static BWD_DEVICE void run(const BwdParams& bp, float* red, int h, int tid) {
    const AttentionParams& p = bp.p;
    const float* lse = static_cast<const float*>(p.lse);
    // Without sink logits there is nothing to differentiate: dsink = 0.
    const int64_t rows = p.sink_logits != nullptr ? bp.rows_q : 0;
    const float z = rows > 0 ? static_cast<float>(p.sink_logit(h)) : 0.f;
    float acc = 0.f;
    for (int64_t r = tid; r < rows; r += kThreads) {
      const int64_t li = lse_index(p, r, h);
      const float l = lse[li];
      if (l != -INFINITY) acc -= expf(z - l) * bp.delta[li];
    }
    red[tid] = acc;
    Ops::sync();
#pragma unroll
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (tid < s) red[tid] += red[tid + s];
      Ops::sync();
    }
    if (tid == 0) {
      if (p.sink_logits_fp64) {
        static_cast<double*>(bp.dsink)[h] = static_cast<double>(red[0]);
      } else {
        static_cast<float*>(bp.dsink)[h] = red[0];
      }
    }
  }
};

// dq = scale * dq_accum, 8 elements per thread.
template <typename Elem>
struct ConvertDqKernel {
  static constexpr int kThreads = 256;

  static BWD_DEVICE void run(const BwdParams& bp, int64_t block, int tid) {
    const int64_t i = (block * kThreads + tid) * 8;
    if (i >= bp.rows_q * bp.p.heads_q * bp.p.head_dim) return;  // head_dim % 8 == 0
    using In = cutlass::AlignedArray<float, 4>;
    const In a = *reinterpret_cast<const In*>(bp.dq_accum + i);
    const In b = *reinterpret_cast<const In*>(bp.dq_accum + i + 4);
    cutlass::AlignedArray<Elem, 8> out;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      out[e] = static_cast<Elem>(a[e] * bp.scale);
      out[e + 4] = static_cast<Elem>(b[e] * bp.scale);
    }
    *reinterpret_cast<cutlass::AlignedArray<Elem, 8>*>(static_cast<Elem*>(bp.dq) + i) = out;
  }
};

}  // namespace longattn::cuda::flash
