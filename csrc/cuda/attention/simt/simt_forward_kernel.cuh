// SIMT attention forward: one CTA per (query tile, q head, sequence), FlashAttention-style
// online softmax over the key tiles MaskParams::key_ranges yields. Empty tiles are skipped,
// full tiles skip the per-element mask. Q, the output accumulator, each K/V tile and the
// score tile live in shared memory in the accumulation type; S = Q K^T and O += P V are CTA
// GEMMs (simt_common.cuh), the softmax runs with a group of threads per query row.
// The row math is the CPU kernel's (cpu/attention_fwd.cpp) step for step.
#pragma once
#include "cuda/attention/simt/simt_common.cuh"

namespace longattn::cuda::simt {

// Online softmax of one score tile, in place: S holds raw dot products for rows [0, bq) x
// keys [0, bk) (valid: nq x nk); afterwards S holds P = exp(logit - m_new) and row_alpha the
// factor the output accumulator must be rescaled by. row_m, row_l are updated.
template <typename A>
__device__ void online_softmax_tile(const AttentionParams& p, const MaskParams& mask, bool masked,
                                    int64_t p0, int64_t s0, int nq, int nk, const SimtTiles& t,
                                    A* S, A* row_m, A* row_l, A* row_alpha, const A* row_rs,
                                    A slope) {
  const ScoreParams& sp = p.score;
  const bool plain = sp.plain();
  const A cap = static_cast<A>(sp.softcap);
  const int g = t.bq * 32 <= kThreads ? 32 : kThreads / t.bq;  // threads per row
  const int c0 = threadIdx.x % g;
  const unsigned lanes = group_lanes(g);
  for (int r = threadIdx.x / g; r < t.bq; r += kThreads / g) {
    A* x = S + r * t.lds;
    const int64_t pos = p0 + r;
    const A rs = row_rs[r];
    // Logits of the visible keys, -inf elsewhere (padding rows and columns included).
    A mx = neg_inf<A>();
    for (int c = c0; c < t.bk; c += g) {
      A v = neg_inf<A>();
      if (r < nq && c < nk && (!masked || mask.visible(pos, s0 + c))) {
        v = plain ? x[c] : transform_logit<A>(x[c], rs, sp, cap, slope, pos, s0 + c, nullptr);
      }
      x[c] = v;
      mx = amax(mx, v);
    }
    mx = group_max(mx, g, lanes);
    // Plain logits are rs * q.k: the scale folds into the exponent (rs > 0 keeps the max).
    const A mul = plain ? rs : A(1);
    if (plain) mx *= mul;
    const A m_old = row_m[r];
    const A m_new = amax(m_old, mx);
    __syncwarp(lanes);  // every lane has read row_m[r] before lane c0 == 0 writes it
    if (m_new == neg_inf<A>()) {  // nothing visible yet: this tile contributes nothing
      for (int c = c0; c < t.bk; c += g) x[c] = A(0);
      if (c0 == 0) row_alpha[r] = A(1);
      continue;
    }
    A sum = A(0);
    for (int c = c0; c < t.bk; c += g) {
      const A e = acc_exp(fma(x[c], mul, -m_new));
      x[c] = e;
      sum += e;
    }
    sum = group_sum(sum, g, lanes);
    if (c0 == 0) {
      const A alpha = acc_exp(m_old - m_new);  // 0 while m_old is -inf
      row_l[r] = row_l[r] * alpha + sum;
      row_m[r] = m_new;
      row_alpha[r] = alpha;
    }
  }
}

// O = diag(row_alpha) O + P V for one key tile (P in S), ending at a barrier. A partial tile
// pairs masked entries (P = 0) with V rows in its product: a non-finite row is zeroed first,
// and the rows that see it become NaN instead (simt_common.cuh).
template <typename A>
__device__ __forceinline__ void accumulate_pv(const QueryTileWork& w, TileKind kind, int64_t s0,
                                              int nk, int D, const SimtTiles& t, const A* S,
                                              A* V, A* O, const A* row_alpha) {
  if (kind != TileKind::kFull && tile_has_nonfinite(V, t.ld, nk, D)) {
    for (int r = threadIdx.x; r < w.nq; r += kThreads) {
      if (sees_nonfinite_row(w.si.mask, w.p0 + r, s0, V, t.ld, nk, D)) {
        for (int d = 0; d < D; ++d) O[r * t.ld + d] = A(NAN);
      }
    }
    __syncthreads();
    zero_nonfinite_rows(V, t.ld, nk, D);
    __syncthreads();
  }
  cta_gemm<A>(t.bq, t.dp, t.bk, S, t.lds, 1, V, t.ld, 1, O, t.ld, true, row_alpha);
  __syncthreads();
}

// The query tile's lse and output after its last key tile, by the row rules of
// common/softmax_row.h (the sink logit joins the denominator and carries no value; fully
// masked rows get out 0, lse -inf); row_l becomes the output's scale.
template <typename T, typename A>
__device__ __forceinline__ void store_query_tile(const AttentionParams& p, const QueryTileWork& w,
                                                 int D, const SimtTiles& t, const A* O,
                                                 const A* row_m, A* row_l) {
  const SeqInfo& si = w.si;
  const ScoreParams& sp = p.score;
  A* lse = static_cast<A*>(p.lse) + lse_offset(p, si, w.b, w.h) + w.i0;
  for (int r = threadIdx.x; r < w.nq; r += kThreads) {
    const A mr = row_m[r];
    const bool sees = mr == neg_inf<A>() && si.mask.row_sees_keys(w.i0 + r, si.k_len);
    const A z = sp.has_sink_logit ? static_cast<A>(p.sink_logit(w.h)) : A(0);
    const RowFinish<A> f = finish_softmax_row<A>(mr, row_l[r], sp.has_sink_logit, z, sees);
    row_l[r] = f.out_scale;
    lse[r] = f.lse;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + out_offset(p, si, w.b, w.h) + w.i0 * p.heads_q * D;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < w.nq; r += kWarps) {
    const A scale = row_l[r];  // 0: not O * 0, which a NaN in O would survive
    T* o = out + static_cast<int64_t>(r) * p.heads_q * D;
    for (int d = lane; d < D; d += 32) o[d] = from_acc<T>(scale == A(0) ? A(0) : O[r * t.ld + d] * scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) simt_forward_kernel(const AttentionParams p,
                                                                const SimtTiles t) {
  using A = acc_t<T>;
  A* smem = dynamic_smem<A>();
  const ForwardSmem L(t);
  A* Qs = smem + L.q;
  A* Os = smem + L.o;
  A* Ks = smem + L.k;
  A* Vs = smem + L.v;
  A* Ss = smem + L.s;
  A* row_m = smem + L.row_m;
  A* row_l = smem + L.row_l;
  A* row_alpha = smem + L.row_alpha;
  A* row_rs = smem + L.row_rs;

  const QueryTileWork w = query_tile_work(p, t.bq);
  if (w.nq == 0) return;  // whole CTA
  const SeqInfo& si = w.si;
  const ScoreParams& sp = p.score;
  const int D = static_cast<int>(p.head_dim);
  const A slope = sp.has_alibi ? static_cast<A>(p.alibi_slopes[w.h]) : A(0);

  load_tile(Qs, t.ld,
            static_cast<const T*>(p.q) + q_offset(p, si, w.b, w.h) + w.i0 * p.q_row_stride,
            p.q_row_stride, w.nq, t.bq, D, t.dp);
  zero_tile(Os, t.ld, t.bq, t.dp);
  for (int r = threadIdx.x; r < t.bq; r += kThreads) {
    row_m[r] = neg_inf<A>();
    row_l[r] = A(0);
    row_alpha[r] = A(1);
    row_rs[r] = static_cast<A>(sp.scale * logn_factor(w.p0 + r, sp.inv_log_logn_base));
  }
  __syncthreads();

  const T* kg = static_cast<const T*>(p.k) + k_offset(p, si, w.b, w.hk);
  const T* vg = static_cast<const T*>(p.v) + v_offset(p, si, w.b, w.hk);
  for_each_key_tile(w, t.bk, [&](int64_t j0, int nk, int64_t s0, TileKind kind) {
    load_tile(Ks, t.ld, kg + j0 * p.k_row_stride, p.k_row_stride, nk, t.bk, D, t.dp);
    load_tile(Vs, t.ld, vg + j0 * p.v_row_stride, p.v_row_stride, nk, t.bk, D, t.dp);
    __syncthreads();
    cta_gemm<A>(t.bq, t.bk, D, Qs, t.ld, 1, Ks, 1, t.ld, Ss, t.lds, false, nullptr);
    __syncthreads();
    online_softmax_tile<A>(p, si.mask, kind != TileKind::kFull, w.p0, s0, w.nq, nk, t, Ss, row_m,
                           row_l, row_alpha, row_rs, slope);
    __syncthreads();
    accumulate_pv<A>(w, kind, s0, nk, D, t, Ss, Vs, Os, row_alpha);
  });

  store_query_tile<T, A>(p, w, D, t, Os, row_m, row_l);
}

}  // namespace longattn::cuda::simt
