// SIMT backward of rope_attention: the SIMT attention backward (attention/simt/
// simt_backward_kernels.cuh: delta and the sink-logit gradient first, then a key-major dK/dV
// pass and a query-major dQ pass, no atomics) over the union of the remap's visible pairs,
// through the rotations. Each pair's score is <q_n, k_n> (near) or <q_f, k_f> (far), so dS
// splits by side into dS_n and dS_f and
//     dq = R_qn^T (dS_n K_n) + R_qf^T (dS_f K_f),   dk = R_kn^T (dS_n^T Q_n) + R_kf^T (dS_f^T Q_f):
// each pass accumulates its dQ or dK per side in the rotated frame and rotates the two back
// once, at the end.
#pragma once
#include "common/key_blocks.h"
#include "cuda/attention/attention_launch.h"
#include "cuda/attention/remap/remap_rotate.cuh"
#include "cuda/attention/remap/remap_tiles.h"

namespace longattn::cuda::remap {

// The shared-memory buffers of a gradient tile (GradSmem).
template <typename A>
struct GradTile {
  A *q, *q_far, *dout, *k, *k_far, *v, *s, *s_far, *dp, *row_lse, *row_delta, *row_rs, *acc,
      *acc_far, *dv;
  __device__ GradTile(A* smem, const GradSmem& L)
      : q(smem + L.q), q_far(smem + L.q_far), dout(smem + L.dout), k(smem + L.k),
        k_far(smem + L.k_far), v(smem + L.v), s(smem + L.s), s_far(smem + L.s_far),
        dp(smem + L.dp), row_lse(smem + L.row_lse), row_delta(smem + L.row_delta),
        row_rs(smem + L.row_rs), acc(smem + L.acc), acc_far(smem + L.acc_far), dv(smem + L.dv) {}
};

// Rows [i0, i0 + nq) of q head h into the tile, rotated on the sides the caller asks for: Q,
// dO, and per row lse (-inf on padding rows, so they get no gradient), delta and the scale.
template <typename T, typename A>
__device__ __forceinline__ void load_query_rows(const RopeAttentionParams& rp,
                                                const AttentionGrads& g, const SeqInfo& si,
                                                int64_t b, int64_t h, int64_t i0, int nq,
                                                bool near, bool far, const SimtTiles& t,
                                                const GradTile<A>& x) {
  const AttentionParams& p = rp.attn;
  const int D = static_cast<int>(p.head_dim);
  const int64_t ld_out = p.heads_q * D;
  simt::load_tile(x.q, t.ld, static_cast<const T*>(p.q) + q_offset(p, si, b, h) + i0 * p.q_row_stride,
                  p.q_row_stride, nq, t.bq, D, t.dp);
  simt::load_tile(x.dout, t.ld, static_cast<const T*>(g.dout) + out_offset(p, si, b, h) + i0 * ld_out,
                  ld_out, nq, t.bq, D, t.dp);
  const int64_t loff = lse_offset(p, si, b, h) + i0;
  const A* lse = static_cast<const A*>(p.lse) + loff;
  const A* delta = static_cast<const A*>(g.workspace) + loff;
  for (int r = threadIdx.x; r < t.bq; r += kThreads) {
    x.row_lse[r] = r < nq ? lse[r] : simt::neg_inf<A>();
    x.row_delta[r] = r < nq ? delta[r] : A(0);
    x.row_rs[r] = static_cast<A>(p.score.scale);
  }
  __syncthreads();
  const int64_t p0 = si.mask.q_start + i0;
  if (far) {
    copy_tile(x.q_far, x.q, t.ld, t.bq, t.dp);
    __syncthreads();
    rotate_tile(x.q_far, t.ld, nq, rp.rot, [&](int r) { return rp.remap.q_rot(Side::kFar, p0 + r); }, false);
  }
  if (near) rotate_tile(x.q, t.ld, nq, rp.rot, [&](int r) { return rp.remap.q_rot(Side::kNear, p0 + r); }, false);
}

// Keys [j0, j0 + nk) of kv head hk into K (near) and K_far, and V.
template <typename T, typename A>
__device__ __forceinline__ void load_key_rows(const RopeAttentionParams& rp, const SeqInfo& si,
                                              int64_t b, int64_t hk, int64_t j0, int nk,
                                              bool near, bool far, const SimtTiles& t,
                                              const GradTile<A>& x) {
  const AttentionParams& p = rp.attn;
  const int D = static_cast<int>(p.head_dim);
  simt::load_tile(x.k, t.ld, static_cast<const T*>(p.k) + k_offset(p, si, b, hk) + j0 * p.k_row_stride,
                  p.k_row_stride, nk, t.bk, D, t.dp);
  simt::load_tile(x.v, t.ld, static_cast<const T*>(p.v) + v_offset(p, si, b, hk) + j0 * p.v_row_stride,
                  p.v_row_stride, nk, t.bk, D, t.dp);
  __syncthreads();
  const int64_t s0 = si.mask.k_start + j0;
  if (far) {
    copy_tile(x.k_far, x.k, t.ld, t.bk, t.dp);
    __syncthreads();
    rotate_tile(x.k_far, t.ld, nk, rp.rot, [&](int c) { return rp.remap.k_rot(Side::kFar, s0 + c); }, false);
  }
  if (near) rotate_tile(x.k, t.ld, nk, rp.rot, [&](int c) { return rp.remap.k_rot(Side::kNear, s0 + c); }, false);
}

// With the scores in S (a tile holding both sides: near in S, far in S_far) and dP = dO V^T:
// P in S, near dS in dP and far dS in S_far (each zero off its side), as
// simt::softmax_grad_tile element for element. Masked and padding entries and fully masked
// rows become 0.
template <typename A>
__device__ void softmax_grad_tile(const AttentionParams& p, const RemapMask& rm, bool masked,
                                  const TileSides& sides, int64_t p0, int64_t s0, int nk,
                                  const SimtTiles& t, const GradTile<A>& x) {
  const ScoreParams& sp = p.score;
  const bool plain = sp.plain();
  const A cap = static_cast<A>(sp.softcap);
  for (int idx = threadIdx.x; idx < t.bq * t.bk; idx += kThreads) {
    const int r = idx >> t.bk_log2, c = idx & (t.bk - 1);
    const int e = r * t.lds + c;
    const A l = x.row_lse[r];
    const int64_t pos = p0 + r, s = s0 + c;
    // Far keys come first on a row; a tile with one side keeps its scores in S.
    const bool is_far = sides.far && (!sides.near || s < rm.near_begin(pos));
    A pv = A(0), ds = A(0);
    if (c < nk && l != simt::neg_inf<A>() && (!masked || rm.all.visible(pos, s))) {
      const A rs = x.row_rs[r];
      A z = is_far && sides.near ? x.s_far[e] : x.s[e], mul = rs, grad = A(1);
      if (!plain) {
        z = simt::transform_logit<A>(z, rs, sp, cap, A(0), pos, s, &grad);
        mul = A(1);
      }
      pv = simt::acc_exp(fma(z, mul, -l));
      ds = pv * (x.dp[e] - x.row_delta[r]) * grad * rs;
    }
    x.s[e] = pv;
    x.dp[e] = is_far ? A(0) : ds;
    if (sides.far) x.s_far[e] = is_far ? ds : A(0);
  }
}

// With Q, K (on the tile's sides), dO, V and the row statistics in place: the scores of each
// side and dP by CTA GEMMs, then P and dS by side. Ends at a barrier.
template <typename A>
__device__ __forceinline__ void recompute_grad_tile(const AttentionParams& p, const RemapMask& rm,
                                                    TileKind kind, const TileSides& sides,
                                                    int64_t p0, int64_t s0, int nk,
                                                    const SimtTiles& t, const GradTile<A>& x) {
  const int D = static_cast<int>(p.head_dim);
  if (sides.near) simt::cta_gemm<A>(t.bq, t.bk, D, x.q, t.ld, 1, x.k, 1, t.ld, x.s, t.lds, false, nullptr);
  if (sides.far) {
    simt::cta_gemm<A>(t.bq, t.bk, D, x.q_far, t.ld, 1, x.k_far, 1, t.ld, sides.near ? x.s_far : x.s,
                      t.lds, false, nullptr);
  }
  simt::cta_gemm<A>(t.bq, t.bk, D, x.dout, t.ld, 1, x.v, 1, t.ld, x.dp, t.lds, false, nullptr);
  __syncthreads();
  softmax_grad_tile<A>(p, rm, kind != TileKind::kFull, sides, p0, s0, nk, t, x);
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) remap_dkdv_kernel(const RopeAttentionParams rp,
                                                              const AttentionGrads g,
                                                              const SimtTiles t) {
  using A = acc_t<T>;
  const AttentionParams& p = rp.attn;
  A* smem = dynamic_smem<A>();
  const bool far = rp.remap.has_far();
  const GradSmem L(t, far, true);
  const GradTile<A> x(smem, L);

  const int64_t bh = p.batch * p.heads_kv;
  const int64_t kb = blockIdx.x / bh;
  const int64_t b = (blockIdx.x % bh) / p.heads_kv, hk = (blockIdx.x % bh) % p.heads_kv;
  const SeqInfo si = seq_info(p, b);
  const MaskParams& mask = si.mask;
  const RemapMask rm = rp.remap_mask(si);
  const KeyBlocks blocks(mask, si.k_len, t.bk);
  if (kb >= blocks.count()) return;  // whole CTA
  const Range keys = blocks.block(kb);
  const int64_t j0 = keys.lo, s0 = mask.k_start + j0;
  const int nk = static_cast<int>(keys.size());
  const int D = static_cast<int>(p.head_dim);
  const Range rows = mask.query_range(j0, j0 + nk, si.q_len);
  // The sides any query tile of the block meets: K is rotated on those once.
  const TileSides block_sides =
      rows.empty() ? TileSides{} : rm.classify(mask.q_start + rows.lo, mask.q_start + rows.hi - 1, s0, s0 + nk - 1);

  load_key_rows<T>(rp, si, b, hk, j0, nk, true, block_sides.far, t, x);
  simt::zero_tile(x.acc, t.ld, t.bk, t.dp);
  if (far) simt::zero_tile(x.acc_far, t.ld, t.bk, t.dp);
  simt::zero_tile(x.dv, t.ld, t.bk, t.dp);
  __syncthreads();

  for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
    for (int64_t i0 = rows.lo; i0 < rows.hi; i0 += t.bq) {
      const int nq = static_cast<int>(min64(t.bq, rows.hi - i0));
      const int64_t p0 = mask.q_start + i0;
      const TileKind kind = mask.classify(p0, p0 + nq - 1, s0, s0 + nk - 1);
      if (kind == TileKind::kEmpty) continue;
      const TileSides sides = rm.classify(p0, p0 + nq - 1, s0, s0 + nk - 1);
      // The previous tile's GEMMs are done with Q, dO, S, dP (trailing barrier below).
      load_query_rows<T>(rp, g, si, b, h, i0, nq, sides.near, sides.far, t, x);
      __syncthreads();
      recompute_grad_tile<A>(p, rm, kind, sides, p0, s0, nk, t, x);
      // dK += dS^T Q pairs masked entries (dS = 0) with Q rows: zero a non-finite one
      // (simt_common.cuh); a row of Q that is not finite has a NaN lse, so the keys it sees
      // get NaN through dS itself.
      if (kind != TileKind::kFull) {
        for (int side = 0; side < 2; ++side) {
          if (!(side == 0 ? sides.near : sides.far)) continue;
          A* qs = side == 0 ? x.q : x.q_far;
          if (simt::tile_has_nonfinite(qs, t.ld, nq, D)) {
            simt::zero_nonfinite_rows(qs, t.ld, nq, D);
            __syncthreads();
          }
        }
      }
      // dV += P^T dO, dK += dS^T Q on each side (the row scale is inside dS).
      simt::cta_gemm<A>(t.bk, t.dp, t.bq, x.s, 1, t.lds, x.dout, t.ld, 1, x.dv, t.ld, true, nullptr);
      if (sides.near) {
        simt::cta_gemm<A>(t.bk, t.dp, t.bq, x.dp, 1, t.lds, x.q, t.ld, 1, x.acc, t.ld, true, nullptr);
      }
      if (sides.far) {
        simt::cta_gemm<A>(t.bk, t.dp, t.bq, x.s_far, 1, t.lds, x.q_far, t.ld, 1, x.acc_far, t.ld,
                          true, nullptr);
      }
      __syncthreads();
    }
  }

  // dk = R_kn^T dK_n + R_kf^T dK_f; keys no query sees get zeros.
  rotate_tile(x.acc, t.ld, nk, rp.rot, [&](int c) { return rp.remap.k_rot(Side::kNear, s0 + c); }, true);
  if (block_sides.far) {
    rotate_tile(x.acc_far, t.ld, nk, rp.rot, [&](int c) { return rp.remap.k_rot(Side::kFar, s0 + c); }, true);
    __syncthreads();
    add_tile(x.acc, x.acc_far, t.ld, nk, D);
  }
  __syncthreads();
  const int64_t kv_row = p.heads_kv * D;
  const int64_t kv_off = ((p.varlen() ? si.k_token0 : b * p.seqlen_k) + j0) * kv_row + hk * D;
  simt::store_tile(static_cast<T*>(g.dk) + kv_off, kv_row, x.acc, t.ld, nk, D);
  simt::store_tile(static_cast<T*>(g.dv) + kv_off, kv_row, x.dv, t.ld, nk, D);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) remap_dq_kernel(const RopeAttentionParams rp,
                                                            const AttentionGrads g,
                                                            const SimtTiles t) {
  using A = acc_t<T>;
  const AttentionParams& p = rp.attn;
  A* smem = dynamic_smem<A>();
  const bool far = rp.remap.has_far();
  const GradSmem L(t, far, false);
  const GradTile<A> x(smem, L);

  const simt::QueryTileWork w = simt::query_tile_work(p, t.bq);
  if (w.nq == 0) return;  // whole CTA
  const SeqInfo& si = w.si;
  const RemapMask rm = rp.remap_mask(si);
  const int D = static_cast<int>(p.head_dim);

  load_query_rows<T>(rp, g, si, w.b, w.h, w.i0, w.nq, true, far, t, x);
  simt::zero_tile(x.acc, t.ld, t.bq, t.dp);
  if (far) simt::zero_tile(x.acc_far, t.ld, t.bq, t.dp);
  __syncthreads();

  simt::for_each_key_tile(w, t.bk, [&](int64_t j0, int nk, int64_t s0, TileKind kind) {
    const TileSides sides = rm.classify(w.p0, w.p1, s0, s0 + nk - 1);
    load_key_rows<T>(rp, si, w.b, w.hk, j0, nk, sides.near, sides.far, t, x);
    __syncthreads();
    recompute_grad_tile<A>(p, rm, kind, sides, w.p0, s0, nk, t, x);
    // dQ += dS K pairs masked entries (dS = 0) with K rows: a non-finite row is zeroed, and
    // the rows that see it (possibly with P = 0: 0 * inf in the dense formula) become NaN.
    if (kind != TileKind::kFull) {
      bool nan_rows_set = false;
      for (int side = 0; side < 2; ++side) {
        if (!(side == 0 ? sides.near : sides.far)) continue;
        A* ks = side == 0 ? x.k : x.k_far;
        if (!simt::tile_has_nonfinite(ks, t.ld, nk, D)) continue;
        if (!nan_rows_set) {
          for (int r = threadIdx.x; r < w.nq; r += kThreads) {
            if (simt::sees_nonfinite_row(si.mask, w.p0 + r, s0, ks, t.ld, nk, D)) {
              for (int d = 0; d < D; ++d) x.acc[r * t.ld + d] = A(NAN);
            }
          }
          nan_rows_set = true;
        }
        __syncthreads();
        simt::zero_nonfinite_rows(ks, t.ld, nk, D);
        __syncthreads();
      }
    }
    if (sides.near) {
      simt::cta_gemm<A>(t.bq, t.dp, t.bk, x.dp, t.lds, 1, x.k, t.ld, 1, x.acc, t.ld, true, nullptr);
    }
    if (sides.far) {
      simt::cta_gemm<A>(t.bq, t.dp, t.bk, x.s_far, t.lds, 1, x.k_far, t.ld, 1, x.acc_far, t.ld,
                        true, nullptr);
    }
    __syncthreads();
  });

  // dq = R_qn^T dQ_n + R_qf^T dQ_f.
  rotate_tile(x.acc, t.ld, w.nq, rp.rot, [&](int r) { return rp.remap.q_rot(Side::kNear, w.p0 + r); }, true);
  if (far) {
    rotate_tile(x.acc_far, t.ld, w.nq, rp.rot, [&](int r) { return rp.remap.q_rot(Side::kFar, w.p0 + r); },
                true);
    __syncthreads();
    add_tile(x.acc, x.acc_far, t.ld, w.nq, D);
  }
  __syncthreads();
  const int64_t ld_out = p.heads_q * D;
  simt::store_tile(static_cast<T*>(g.dq) + out_offset(p, si, w.b, w.h) + w.i0 * ld_out, ld_out, x.acc,
                   t.ld, w.nq, D);
}

}  // namespace longattn::cuda::remap
