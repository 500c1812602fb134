// SIMT attention backward, deterministic by construction (no atomics anywhere):
//   1. delta:  D_i = rowsum(dO_i * O_i) - dlse_i, a warp per (row, q head), into the workspace;
//   2. dsink:  -sum_i P_sink_i D_i, a CTA per q head summing its rows in a fixed order;
//   3. dK, dV: a CTA per (key block, kv head, sequence) walks the query tiles
//              MaskParams::query_range lets see its keys, for every q head of the GQA group,
//              recomputing P from lse, and writes its block once;
//   4. dQ:     a CTA per (query tile, q head, sequence) walks the key tiles of key_ranges,
//              recomputing P and dS, and writes its tile once.
// P, dS and the softcap chain are the CPU kernel's (cpu/attention_bwd.cpp) element for element.
#pragma once
#include "common/key_blocks.h"
#include "cuda/attention/attention_launch.h"
#include "cuda/attention/simt/simt_common.cuh"

namespace longattn::cuda::simt {

// lse index of (token, head): dense lse is (B, Hq, Lq), varlen (Hq, Tq); tokens run over the
// rows of the contiguous out, (b * Lq + i) dense, the packed token varlen.
__device__ __forceinline__ int64_t lse_index(const AttentionParams& p, int64_t token, int64_t h) {
  if (p.varlen()) return h * p.total_q + token;
  const int64_t b = token / p.seqlen_q, i = token % p.seqlen_q;
  return (b * p.heads_q + h) * p.seqlen_q + i;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) simt_delta_kernel(const AttentionParams p,
                                                              const AttentionGrads g) {
  using A = acc_t<T>;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= p.total_q * p.heads_q) return;  // whole warps
  const int lane = threadIdx.x & 31;
  const int64_t token = item / p.heads_q, h = item % p.heads_q;
  const int64_t D = p.head_dim;
  // out, dout: contiguous (tokens, Hq, D), so item is the row index.
  const T* o = static_cast<const T*>(p.out) + item * D;
  const T* d = static_cast<const T*>(g.dout) + item * D;
  A acc = A(0);
  for (int64_t c = lane; c < D; c += 32) acc += to_acc(o[c]) * to_acc(d[c]);
  acc = group_sum(acc, 32, 0xffffffffu);
  if (lane == 0) {
    const int64_t li = lse_index(p, token, h);
    const A dl = g.dlse != nullptr ? static_cast<const A*>(g.dlse)[li] : A(0);
    static_cast<A*>(g.workspace)[li] = acc - dl;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) simt_dsink_kernel(const AttentionParams p,
                                                              const AttentionGrads g) {
  using A = acc_t<T>;
  __shared__ A partial[kThreads];
  const int64_t h = blockIdx.x;
  const A z = static_cast<A>(p.sink_logit(h));
  const A* lse = static_cast<const A*>(p.lse);
  const A* delta = static_cast<const A*>(g.workspace);
  A acc = A(0);
  for (int64_t token = threadIdx.x; token < p.total_q; token += kThreads) {
    const int64_t li = lse_index(p, token, h);
    const A l = lse[li];
    if (l == neg_inf<A>()) continue;  // fully masked row: no gradient
    acc -= acc_exp(z - l) * delta[li];
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (p.sink_logits_fp64) {
      static_cast<double*>(g.dsink)[h] = static_cast<double>(partial[0]);
    } else {
      static_cast<float*>(g.dsink)[h] = static_cast<float>(partial[0]);
    }
  }
}

// The shared-memory buffers of a gradient tile; DqSmem and DkDvSmem both lay them out.
template <typename A>
struct GradTile {
  A *q, *dout, *k, *v, *s, *dp, *row_lse, *row_delta, *row_rs;
  template <typename Layout>
  __device__ GradTile(A* smem, const Layout& L)
      : q(smem + L.q), dout(smem + L.dout), k(smem + L.k), v(smem + L.v), s(smem + L.s),
        dp(smem + L.dp), row_lse(smem + L.row_lse), row_delta(smem + L.row_delta),
        row_rs(smem + L.row_rs) {}
};

// Rows [i0, i0 + nq) of q head h of sequence b into the tile: Q, dO, and per row lse (-inf on
// padding rows, so they get no gradient), delta and rs = scale * log-n factor.
template <typename T, typename A>
__device__ __forceinline__ void load_query_rows(const AttentionParams& p, const AttentionGrads& g,
                                                const SeqInfo& si, int64_t b, int64_t h,
                                                int64_t i0, int nq, const SimtTiles& t,
                                                const GradTile<A>& x) {
  const int D = static_cast<int>(p.head_dim);
  const int64_t ld_out = p.heads_q * D;
  load_tile(x.q, t.ld, static_cast<const T*>(p.q) + q_offset(p, si, b, h) + i0 * p.q_row_stride,
            p.q_row_stride, nq, t.bq, D, t.dp);
  load_tile(x.dout, t.ld, static_cast<const T*>(g.dout) + out_offset(p, si, b, h) + i0 * ld_out,
            ld_out, nq, t.bq, D, t.dp);
  const int64_t loff = lse_offset(p, si, b, h) + i0;
  const A* lse = static_cast<const A*>(p.lse) + loff;
  const A* delta = static_cast<const A*>(g.workspace) + loff;
  const ScoreParams& sp = p.score;
  for (int r = threadIdx.x; r < t.bq; r += kThreads) {
    x.row_lse[r] = r < nq ? lse[r] : neg_inf<A>();
    x.row_delta[r] = r < nq ? delta[r] : A(0);
    x.row_rs[r] = static_cast<A>(sp.scale * logn_factor(si.mask.q_start + i0 + r, sp.inv_log_logn_base));
  }
}

// Scores S (raw Q K^T) and dP (dO V^T) of a tile -> P in S and dS = P (dP - D) (chained
// through softcap and the row scale back to q.k) in dP. Masked and padding entries and fully
// masked rows become 0.
template <typename A>
__device__ void softmax_grad_tile(const AttentionParams& p, const MaskParams& mask, bool masked,
                                  int64_t p0, int64_t s0, int nk, const SimtTiles& t,
                                  const GradTile<A>& x, A slope) {
  const ScoreParams& sp = p.score;
  const bool plain = sp.plain();
  const A cap = static_cast<A>(sp.softcap);
  for (int idx = threadIdx.x; idx < t.bq * t.bk; idx += kThreads) {
    const int r = idx >> t.bk_log2, c = idx & (t.bk - 1);
    const int e = r * t.lds + c;
    const A l = x.row_lse[r];
    A pv = A(0), ds = A(0);
    if (c < nk && l != neg_inf<A>() && (!masked || mask.visible(p0 + r, s0 + c))) {
      const A rs = x.row_rs[r];
      A z = x.s[e], mul = rs, grad = A(1);
      if (!plain) {
        z = transform_logit<A>(z, rs, sp, cap, slope, p0 + r, s0 + c, &grad);
        mul = A(1);
      }
      pv = acc_exp(fma(z, mul, -l));
      ds = pv * (x.dp[e] - x.row_delta[r]) * grad * rs;
    }
    x.s[e] = pv;
    x.dp[e] = ds;
  }
}

// With Q, dO, K, V and the row statistics in place: S and dP by two CTA GEMMs, then P and dS
// in their place. Ends at a barrier.
template <typename A>
__device__ __forceinline__ void recompute_grad_tile(const AttentionParams& p,
                                                    const MaskParams& mask, TileKind kind,
                                                    int64_t p0, int64_t s0, int nk,
                                                    const SimtTiles& t, const GradTile<A>& x,
                                                    A slope) {
  const int D = static_cast<int>(p.head_dim);
  cta_gemm<A>(t.bq, t.bk, D, x.q, t.ld, 1, x.k, 1, t.ld, x.s, t.lds, false, nullptr);
  cta_gemm<A>(t.bq, t.bk, D, x.dout, t.ld, 1, x.v, 1, t.ld, x.dp, t.lds, false, nullptr);
  __syncthreads();
  softmax_grad_tile<A>(p, mask, kind != TileKind::kFull, p0, s0, nk, t, x, slope);
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) simt_dkdv_kernel(const AttentionParams p,
                                                             const AttentionGrads g,
                                                             const SimtTiles t) {
  using A = acc_t<T>;
  A* smem = dynamic_smem<A>();
  const DkDvSmem L(t);
  const GradTile<A> x(smem, L);
  A* dKs = smem + L.dk;
  A* dVs = smem + L.dv;

  // Block id -> (key block, sequence, kv head); the first key blocks (the costliest under
  // causal masks) come first.
  const int64_t bh = p.batch * p.heads_kv;
  const int64_t kb = blockIdx.x / bh;
  const int64_t b = (blockIdx.x % bh) / p.heads_kv, hk = (blockIdx.x % bh) % p.heads_kv;
  const SeqInfo si = seq_info(p, b);
  const MaskParams& mask = si.mask;
  const KeyBlocks blocks(mask, si.k_len, t.bk);
  if (kb >= blocks.count()) return;  // whole CTA
  const Range keys = blocks.block(kb);
  const int64_t j0 = keys.lo, s0 = mask.k_start + j0;
  const int nk = static_cast<int>(keys.size());
  const int D = static_cast<int>(p.head_dim);

  load_tile(x.k, t.ld, static_cast<const T*>(p.k) + k_offset(p, si, b, hk) + j0 * p.k_row_stride,
            p.k_row_stride, nk, t.bk, D, t.dp);
  load_tile(x.v, t.ld, static_cast<const T*>(p.v) + v_offset(p, si, b, hk) + j0 * p.v_row_stride,
            p.v_row_stride, nk, t.bk, D, t.dp);
  zero_tile(dKs, t.ld, t.bk, t.dp);
  zero_tile(dVs, t.ld, t.bk, t.dp);

  const Range rows = mask.query_range(j0, j0 + nk, si.q_len);
  for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
    const A slope = p.score.has_alibi ? static_cast<A>(p.alibi_slopes[h]) : A(0);
    for (int64_t i0 = rows.lo; i0 < rows.hi; i0 += t.bq) {
      const int nq = static_cast<int>(min64(t.bq, rows.hi - i0));
      const int64_t p0 = mask.q_start + i0;
      const TileKind kind = mask.classify(p0, p0 + nq - 1, s0, s0 + nk - 1);
      if (kind == TileKind::kEmpty) continue;
      // The previous tile's GEMMs are done with Q, dO, S, dP (trailing barrier below).
      load_query_rows<T>(p, g, si, b, h, i0, nq, t, x);
      __syncthreads();
      recompute_grad_tile<A>(p, mask, kind, p0, s0, nk, t, x, slope);
      // dK += dS^T Q pairs masked entries (dS = 0) with Q rows: zero a non-finite one
      // (simt_common.cuh); a row of Q that is not finite has a NaN lse, so the keys it sees
      // get NaN through dS itself.
      if (kind != TileKind::kFull && tile_has_nonfinite(x.q, t.ld, nq, D)) {
        zero_nonfinite_rows(x.q, t.ld, nq, D);
        __syncthreads();
      }
      // dV += P^T dO, dK += dS^T Q (the row scale is inside dS).
      cta_gemm<A>(t.bk, t.dp, t.bq, x.s, 1, t.lds, x.dout, t.ld, 1, dVs, t.ld, true, nullptr);
      cta_gemm<A>(t.bk, t.dp, t.bq, x.dp, 1, t.lds, x.q, t.ld, 1, dKs, t.ld, true, nullptr);
      __syncthreads();
    }
  }

  // dk, dv: contiguous with k's shape, row stride heads_kv * D. Keys no query sees get zeros.
  __syncthreads();
  const int64_t kv_row = p.heads_kv * D;
  const int64_t kv_off = ((p.varlen() ? si.k_token0 : b * p.seqlen_k) + j0) * kv_row + hk * D;
  store_tile(static_cast<T*>(g.dk) + kv_off, kv_row, dKs, t.ld, nk, D);
  store_tile(static_cast<T*>(g.dv) + kv_off, kv_row, dVs, t.ld, nk, D);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) simt_dq_kernel(const AttentionParams p,
                                                           const AttentionGrads g,
                                                           const SimtTiles t) {
  using A = acc_t<T>;
  A* smem = dynamic_smem<A>();
  const DqSmem L(t);
  const GradTile<A> x(smem, L);
  A* dQs = smem + L.dq;

  const QueryTileWork w = query_tile_work(p, t.bq);
  if (w.nq == 0) return;  // whole CTA
  const SeqInfo& si = w.si;
  const int D = static_cast<int>(p.head_dim);
  const A slope = p.score.has_alibi ? static_cast<A>(p.alibi_slopes[w.h]) : A(0);

  load_query_rows<T>(p, g, si, w.b, w.h, w.i0, w.nq, t, x);
  zero_tile(dQs, t.ld, t.bq, t.dp);
  __syncthreads();

  const T* kg = static_cast<const T*>(p.k) + k_offset(p, si, w.b, w.hk);
  const T* vg = static_cast<const T*>(p.v) + v_offset(p, si, w.b, w.hk);
  for_each_key_tile(w, t.bk, [&](int64_t j0, int nk, int64_t s0, TileKind kind) {
    load_tile(x.k, t.ld, kg + j0 * p.k_row_stride, p.k_row_stride, nk, t.bk, D, t.dp);
    load_tile(x.v, t.ld, vg + j0 * p.v_row_stride, p.v_row_stride, nk, t.bk, D, t.dp);
    __syncthreads();
    recompute_grad_tile<A>(p, si.mask, kind, w.p0, s0, nk, t, x, slope);
    // dQ += dS K pairs masked entries (dS = 0) with K rows: a non-finite row is zeroed, and
    // the rows that see it (possibly with P = 0: 0 * inf in the dense formula) become NaN.
    if (kind != TileKind::kFull && tile_has_nonfinite(x.k, t.ld, nk, D)) {
      for (int r = threadIdx.x; r < w.nq; r += kThreads) {
        if (sees_nonfinite_row(si.mask, w.p0 + r, s0, x.k, t.ld, nk, D)) {
          for (int d = 0; d < D; ++d) dQs[r * t.ld + d] = A(NAN);
        }
      }
      __syncthreads();
      zero_nonfinite_rows(x.k, t.ld, nk, D);
      __syncthreads();
    }
    cta_gemm<A>(t.bq, t.dp, t.bk, x.dp, t.lds, 1, x.k, t.ld, 1, dQs, t.ld, true, nullptr);
    __syncthreads();
  });
  const int64_t ld_out = p.heads_q * D;
  store_tile(static_cast<T*>(g.dq) + out_offset(p, si, w.b, w.h) + w.i0 * ld_out, ld_out, dQs,
             t.ld, w.nq, D);
}

}  // namespace longattn::cuda::simt
