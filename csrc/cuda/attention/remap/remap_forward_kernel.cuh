// SIMT forward of rope_attention: the SIMT attention forward (attention/simt/
// simt_forward_kernel.cuh: a CTA per (query tile, q head, sequence), online softmax over the
// key tiles of the mask) over the union of the remap's visible pairs, with the query tile
// rotated once per side and each key tile rotated on the sides its pairs take
// (common/remap.h: TileSides). A tile wholly near or wholly far computes one score tile; one
// holding both computes the two and takes each pair's score from its side.
#pragma once
#include "cuda/attention/remap/remap_rotate.cuh"
#include "cuda/attention/remap/remap_tiles.h"
#include "cuda/attention/simt/simt_forward_kernel.cuh"

namespace longattn::cuda::remap {

using simt::amax;
using simt::neg_inf;

// Online softmax of one tile as simt::online_softmax_tile, the logit of each pair read from
// its side's score tile (S near, S_far far); afterwards S holds P.
template <typename A>
__device__ void online_softmax_tile(const AttentionParams& p, const RemapMask& rm, bool masked,
                                    bool both, int64_t p0, int64_t s0, int nq, int nk,
                                    const SimtTiles& t, A* S, const A* S_far, A* row_m, A* row_l,
                                    A* row_alpha, const A* row_rs) {
  const ScoreParams& sp = p.score;
  const bool plain = sp.plain();
  const A cap = static_cast<A>(sp.softcap);
  const int g = t.bq * 32 <= kThreads ? 32 : kThreads / t.bq;  // threads per row
  const int c0 = threadIdx.x % g;
  const unsigned lanes = simt::group_lanes(g);
  for (int r = threadIdx.x / g; r < t.bq; r += kThreads / g) {
    A* x = S + r * t.lds;
    const int64_t pos = p0 + r;
    const A rs = row_rs[r];
    // In a tile holding both sides, a row's far keys come first (scores in S_far).
    const int64_t far_end = both ? rm.near_begin(pos) : -kUnbounded;
    A mx = neg_inf<A>();
    for (int c = c0; c < t.bk; c += g) {
      A v = neg_inf<A>();
      if (r < nq && c < nk && (!masked || rm.all.visible(pos, s0 + c))) {
        const A raw = s0 + c < far_end ? S_far[r * t.lds + c] : x[c];
        v = plain ? raw : simt::transform_logit<A>(raw, rs, sp, cap, A(0), pos, s0 + c, nullptr);
      }
      x[c] = v;
      mx = amax(mx, v);
    }
    mx = simt::group_max(mx, g, lanes);
    const A mul = plain ? rs : A(1);
    if (plain) mx *= mul;
    const A m_old = row_m[r];
    const A m_new = amax(m_old, mx);
    __syncwarp(lanes);  // every lane has read row_m[r] before lane c0 == 0 writes it
    if (m_new == neg_inf<A>()) {
      for (int c = c0; c < t.bk; c += g) x[c] = A(0);
      if (c0 == 0) row_alpha[r] = A(1);
      continue;
    }
    A sum = A(0);
    for (int c = c0; c < t.bk; c += g) {
      const A e = simt::acc_exp(fma(x[c], mul, -m_new));
      x[c] = e;
      sum += e;
    }
    sum = simt::group_sum(sum, g, lanes);
    if (c0 == 0) {
      const A alpha = simt::acc_exp(m_old - m_new);
      row_l[r] = row_l[r] * alpha + sum;
      row_m[r] = m_new;
      row_alpha[r] = alpha;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) remap_forward_kernel(const RopeAttentionParams rp,
                                                                 const SimtTiles t) {
  using A = acc_t<T>;
  const AttentionParams& p = rp.attn;
  A* smem = dynamic_smem<A>();
  const bool far = rp.remap.has_far();
  const ForwardSmem L(t, far);
  A* Qs = smem + L.q;
  A* Qf = smem + L.q_far;
  A* Os = smem + L.o;
  A* Ks = smem + L.k;
  A* Kf = smem + L.k_far;
  A* Vs = smem + L.v;
  A* Ss = smem + L.s;
  A* Sf = smem + L.s_far;
  A* row_m = smem + L.row_m;
  A* row_l = smem + L.row_l;
  A* row_alpha = smem + L.row_alpha;
  A* row_rs = smem + L.row_rs;

  const simt::QueryTileWork w = simt::query_tile_work(p, t.bq);
  if (w.nq == 0) return;  // whole CTA
  const SeqInfo& si = w.si;
  const RemapMask rm = rp.remap_mask(si);
  const ScoreParams& sp = p.score;
  const int D = static_cast<int>(p.head_dim);
  auto q_spec = [&](Side side) { return [&, side](int r) { return rp.remap.q_rot(side, w.p0 + r); }; };

  simt::load_tile(Qs, t.ld,
                  static_cast<const T*>(p.q) + q_offset(p, si, w.b, w.h) + w.i0 * p.q_row_stride,
                  p.q_row_stride, w.nq, t.bq, D, t.dp);
  simt::zero_tile(Os, t.ld, t.bq, t.dp);
  for (int r = threadIdx.x; r < t.bq; r += kThreads) {
    row_m[r] = neg_inf<A>();
    row_l[r] = A(0);
    row_alpha[r] = A(1);
    row_rs[r] = static_cast<A>(sp.scale);
  }
  __syncthreads();
  if (far) {
    copy_tile(Qf, Qs, t.ld, t.bq, t.dp);
    __syncthreads();
    rotate_tile(Qf, t.ld, w.nq, rp.rot, q_spec(Side::kFar), false);
  }
  rotate_tile(Qs, t.ld, w.nq, rp.rot, q_spec(Side::kNear), false);
  __syncthreads();

  const T* kg = static_cast<const T*>(p.k) + k_offset(p, si, w.b, w.hk);
  const T* vg = static_cast<const T*>(p.v) + v_offset(p, si, w.b, w.hk);
  simt::for_each_key_tile(w, t.bk, [&](int64_t j0, int nk, int64_t s0, TileKind kind) {
    const TileSides sides = rm.classify(w.p0, w.p1, s0, s0 + nk - 1);
    auto k_spec = [&](Side side) { return [&, side](int c) { return rp.remap.k_rot(side, s0 + c); }; };
    simt::load_tile(Ks, t.ld, kg + j0 * p.k_row_stride, p.k_row_stride, nk, t.bk, D, t.dp);
    simt::load_tile(Vs, t.ld, vg + j0 * p.v_row_stride, p.v_row_stride, nk, t.bk, D, t.dp);
    __syncthreads();
    if (sides.far) {
      copy_tile(Kf, Ks, t.ld, t.bk, t.dp);
      __syncthreads();
      rotate_tile(Kf, t.ld, nk, rp.rot, k_spec(Side::kFar), false);
    }
    if (sides.near) rotate_tile(Ks, t.ld, nk, rp.rot, k_spec(Side::kNear), false);
    __syncthreads();
    if (sides.near) simt::cta_gemm<A>(t.bq, t.bk, D, Qs, t.ld, 1, Ks, 1, t.ld, Ss, t.lds, false, nullptr);
    if (sides.far) {
      simt::cta_gemm<A>(t.bq, t.bk, D, Qf, t.ld, 1, Kf, 1, t.ld, sides.near ? Sf : Ss, t.lds, false,
                        nullptr);
    }
    __syncthreads();
    online_softmax_tile<A>(p, rm, kind != TileKind::kFull, sides.both(), w.p0, s0, w.nq, nk, t, Ss,
                           Sf, row_m, row_l, row_alpha, row_rs);
    __syncthreads();
    simt::accumulate_pv<A>(w, kind, s0, nk, D, t, Ss, Vs, Os, row_alpha);
  });

  simt::store_query_tile<T, A>(p, w, D, t, Os, row_m, row_l);
}

}  // namespace longattn::cuda::remap
