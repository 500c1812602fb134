// Main backward kernel body: one CTA per (key block, kv head, sequence).
//
// K and V of the block stay in shared memory; the CTA walks, for every q head of the GQA
// group, the query tiles that can see the block (MaskParams::query_range, tiles classified
// by MaskParams::classify: empty ones skipped, per-element masking only on partial ones),
// recomputes P from the saved lse and accumulates dK and dV in fp32 registers for the whole
// group. dK/dV are written once at the end (no atomics: deterministic). dQ = dS K of each tile
// is added to the fp32 workspace with atomicAdd, unless bp.dq_accum is null (deterministic
// mode: the dQ kernel computes dQ on its own).
//
// Per tile (Q and dO already in smem):
//   S = Q K^T -> P (fp32 regs) -> sP        dP = dO V^T -> dS -> sdS
//   dV += P^T dO        dQ = dS K (atomics)        dK += dS^T Q
// Q is double-buffered: the next tile's Q is loaded while this tile finishes; the next dO
// once dV no longer needs the buffer.
#pragma once
#include "cuda/attention/flash/bwd_scores.h"
#include "cuda/attention/flash/bwd_traits.h"
#include "cuda/attention/flash/nonfinite.h"

namespace longattn::cuda::flash {

template <class Kt, bool kSoftcap>
BWD_DEVICE void dkdv_block(const BwdParams& bp, char* smem, int n_block, int hk, int b, int tid) {
  using Elem = typename Kt::Elem;
  using Ops = typename Kt::Ops;
  constexpr int M = Kt::kBlockM, N = Kt::kBlockN, D = Kt::kHeadDim;
  const AttentionParams& p = bp.p;
  const SeqInfo si = seq_info(p, b);
  const MaskParams& mask = si.mask;
  const int64_t j0 = int64_t(n_block) * N;
  if (j0 >= si.k_len) return;
  const int nk = static_cast<int>(min64(N, si.k_len - j0));

  // Query tiles (aligned to M) that may see this key block, times the group's q heads.
  const Range rows = si.q_len > 0 ? mask.query_range(j0, j0 + nk, si.q_len) : Range{0, 0};
  const int m_lo = rows.empty() ? 0 : static_cast<int>(rows.lo / M);
  const int n_m = rows.empty() ? 0 : static_cast<int>(ceil_div(rows.hi, M)) - m_lo;
  const int group = static_cast<int>(p.group());
  const int n_tiles = group * n_m;
  auto head_of = [&](int t) { return hk * group + t / n_m; };
  auto row0_of = [&](int t) { return int64_t(m_lo + t % n_m) * M; };
  auto next_tile = [&](int t) {
    while (t < n_tiles && tile_geom<M, N>(si, row0_of(t), j0).empty) ++t;
    return t;
  };

  // Shared memory: Q[2] | dO | K | V | dS | P.
  Elem* const s_base = reinterpret_cast<Elem*>(smem);
  Elem* const s_do = s_base + 2 * Kt::kQElems;
  Elem* const s_k = s_do + Kt::kQElems;
  Elem* const s_v = s_k + Kt::kKElems;
  Elem* const s_ds = s_v + Kt::kKElems;
  Elem* const s_p = s_ds + Kt::kSElems;
  auto smem_q = [&](int buf) { return make_tensor(make_smem_ptr(s_base + buf * Kt::kQElems), typename Kt::SmemLayoutQ{}); };
  auto smem_qt = [&](int buf) { return make_tensor(make_smem_ptr(s_base + buf * Kt::kQElems), typename Kt::SmemLayoutQt{}); };
  Tensor sdO = make_tensor(make_smem_ptr(s_do), typename Kt::SmemLayoutQ{});
  Tensor sdOt = make_tensor(make_smem_ptr(s_do), typename Kt::SmemLayoutQt{});
  Tensor sK = make_tensor(make_smem_ptr(s_k), typename Kt::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(s_k), typename Kt::SmemLayoutKt{});
  Tensor sV = make_tensor(make_smem_ptr(s_v), typename Kt::SmemLayoutK{});
  Tensor sdS = make_tensor(make_smem_ptr(s_ds), typename Kt::SmemLayoutS{});
  Tensor sdSt = make_tensor(make_smem_ptr(s_ds), typename Kt::SmemLayoutSt{});
  Tensor sP = make_tensor(make_smem_ptr(s_p), typename Kt::SmemLayoutS{});
  Tensor sPt = make_tensor(make_smem_ptr(s_p), typename Kt::SmemLayoutSt{});

  const int64_t ldo = p.heads_q * D;  // row stride of dO / out / dQ
  auto load_q = [&](int t, int buf) {
    const int64_t i0 = row0_of(t);
    const Elem* q = static_cast<const Elem*>(p.q) + q_offset(p, si, b, head_of(t)) + i0 * p.q_row_stride;
    Tensor sQ = smem_q(buf);
    load_tile<Kt>(make_tensor(make_gmem_ptr(q), Shape<Int<M>, Int<D>>{}, make_stride(p.q_row_stride, _1{})), sQ,
                  static_cast<int>(min64(M, si.q_len - i0)), tid);
  };
  auto load_do = [&](int t) {
    const int64_t i0 = row0_of(t);
    const Elem* dout = static_cast<const Elem*>(bp.dout) + out_offset(p, si, b, head_of(t)) + i0 * ldo;
    load_tile<Kt>(make_tensor(make_gmem_ptr(dout), Shape<Int<M>, Int<D>>{}, make_stride(ldo, _1{})), sdO,
                  static_cast<int>(min64(M, si.q_len - i0)), tid);
  };

  const SmemGemm<typename Kt::TiledMmaSdP, typename Kt::SmemCopyAtom, typename Kt::SmemCopyAtom> gemm_sdp(tid);
  const SmemGemm<typename Kt::TiledMmadKV, typename Kt::SmemCopyAtomT, typename Kt::SmemCopyAtomT> gemm_dkv(tid);
  const SmemGemm<typename Kt::TiledMmadQ, typename Kt::SmemCopyAtom, typename Kt::SmemCopyAtomT> gemm_dq(tid);

  // The (row, col) of each of this thread's S / dP accumulator elements.
  const auto cS = acc_coords<typename Kt::TiledMmaSdP, M, N>(tid);
  constexpr int kRows = decltype(size<0>(cS))::value;

  Tensor acc_dk = partition_fragment_C(typename Kt::TiledMmadKV{}, Shape<Int<N>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(typename Kt::TiledMmadKV{}, Shape<Int<N>, Int<D>>{});
  clear(acc_dk);
  clear(acc_dv);

  auto load_k = [&]() {
    const Elem* k = static_cast<const Elem*>(p.k) + k_offset(p, si, b, hk) + j0 * p.k_row_stride;
    load_tile<Kt>(make_tensor(make_gmem_ptr(k), Shape<Int<N>, Int<D>>{}, make_stride(p.k_row_stride, _1{})), sK, nk, tid);
  };
  // This thread's cp.async shares of K and of a Q buffer (nonfinite.h).
  const auto gmem_thr = typename Kt::GmemLoad{}.get_thread_slice(tid);
  Tensor k_share = gmem_thr.partition_D(sK);

  // A non-finite K row (atomic dQ only): dQ = dS K pairs masked entries (dS = 0) with K rows,
  // but S = Q K^T needs the raw K, and K stays for every query tile. So the block is scanned
  // once; a masked tile of a block that holds one marks its dQ rows that see such a key NaN,
  // zeroes the non-finite values for its dQ product, and reloads the raw K from global memory
  // after it (no second K buffer in shared memory for a case that finite inputs never pay for).
  bool k_bad = false;
  int t = next_tile(0);
  if (t < n_tiles) {
    load_k();
    Ops::cp_async_fence();
    const Elem* v = static_cast<const Elem*>(p.v) + v_offset(p, si, b, hk) + j0 * p.v_row_stride;
    load_tile<Kt>(make_tensor(make_gmem_ptr(v), Shape<Int<N>, Int<D>>{}, make_stride(p.v_row_stride, _1{})), sV, nk, tid);
    load_q(t, 0);
    load_do(t);
    Ops::cp_async_fence();
    if (bp.dq_accum != nullptr) {
      Ops::template cp_async_wait<1>();  // this thread's K copies
      k_bad = Ops::sync_or(share_has_nonfinite(k_share)) != 0;
    }
  }

  int buf = 0;
  while (t < n_tiles) {
    const int h = head_of(t);
    const TileGeom tg = tile_geom<M, N>(si, row0_of(t), j0);
    const int64_t loff = lse_offset(p, si, b, h) + tg.i0;
    TileRows<kRows> rw;
    load_tile_rows(rw, cS, static_cast<const float*>(p.lse) + loff, bp.delta + loff, si, tg,
                   p.score.inv_log_logn_base);
    const float slope = p.score.has_alibi ? p.alibi_slopes[h] : 0.f;

    Ops::template cp_async_wait<0>();
    Ops::sync();

    Tensor acc_s = partition_fragment_C(typename Kt::TiledMmaSdP{}, Shape<Int<M>, Int<N>>{});
    Tensor gcap = make_tensor<SoftcapGrad>(acc_rowcol(acc_s.layout()));  // softcap only
    tile_probs<kSoftcap>(gemm_sdp, acc_s, gcap, smem_q(buf), sK, cS, rw, bp, si, tg, slope);
    store_frag<Kt>(gemm_sdp.mma, convert_frag<Elem>(acc_s), sP, tid);
    Tensor acc_dp = partition_fragment_C(typename Kt::TiledMmaSdP{}, Shape<Int<M>, Int<N>>{});
    tile_dscores<kSoftcap>(gemm_sdp, acc_dp, acc_s, gcap, sdO, sV, rw, tg);

    // The other Q buffer was last read by the previous tile, before this tile's first sync.
    const int t_next = next_tile(t + 1);
    if (t_next < n_tiles) {
      load_q(t_next, buf ^ 1);
      Ops::cp_async_fence();
    }
    store_frag<Kt>(gemm_sdp.mma, convert_frag<Elem>(acc_dp), sdS, tid);
    Ops::sync();  // sP, sdS complete; every warp is done with S = Q K^T
    if (tg.masked) {
      // dK += dS^T Q pairs masked entries (dS = 0) with Q rows: zero this thread's non-finite
      // Q values (visible at the next barrier). A non-finite q row has a NaN lse, so the keys
      // it sees get NaN through dS itself.
      Tensor q_share = gmem_thr.partition_D(smem_q(buf));
      if (share_has_nonfinite(q_share)) zero_share_nonfinite(q_share);
    }

    gemm_dkv.run(acc_dv, sPt, sdOt);
    Ops::sync();  // every warp is done with sdO
    if (t_next < n_tiles) {
      load_do(t_next);
      Ops::cp_async_fence();
    }

    if (bp.dq_accum != nullptr) {
      Tensor acc_dq = partition_fragment_C(typename Kt::TiledMmadQ{}, Shape<Int<M>, Int<D>>{});
      clear(acc_dq);
      Tensor cdq = typename Kt::TiledMmadQ{}.get_thread_slice(tid).partition_C(
          make_identity_tensor(Shape<Int<M>, Int<D>>{}));
      const bool k_fix = k_bad && tg.masked;  // see k_bad
      if (k_fix) {
        const int64_t p0 = mask.q_start + tg.i0, s0 = mask.k_start + j0;
        Tensor acc_dq_rc = make_tensor(acc_dq.data(), acc_rowcol(acc_dq.layout()));
        nan_rows_seeing_nonfinite<Ops, N>(acc_dq_rc, make_tensor(cdq.data(), acc_rowcol(cdq.layout())), sK,
                                          TileMask(mask, p0, s0, nk), tid % 32);
        Ops::sync();  // every warp is done scanning K
        zero_share_nonfinite(k_share);
        Ops::sync();
      }
      gemm_dq.run(acc_dq, sdS, sKt);
      float* dq = bp.dq_accum + out_offset(p, si, b, h) + tg.i0 * ldo;
#pragma unroll
      for (int i = 0; i < size(acc_dq); ++i) {
        const int row = get<0>(cdq(i));
        if (row < tg.nq) Ops::atomic_add(dq + row * ldo + get<1>(cdq(i)), acc_dq(i));
      }
      if (k_fix) {
        Ops::sync();  // every warp is done with the zeroed K
        load_k();     // landed by the next tile's (or the epilogue's) wait and barrier
        Ops::cp_async_fence();
      }
    }

    gemm_dkv.run(acc_dk, sdSt, smem_qt(buf));
    buf ^= 1;
    t = t_next;
  }

  // Epilogue: dK (scaled back by the softmax scale) and dV through smem (the K / V buffers)
  // to coalesced 16-byte stores. Keys no query sees get zeros.
  Ops::template cp_async_wait<0>();
  Ops::sync();
#pragma unroll
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= bp.scale;
  store_frag<Kt>(gemm_dkv.mma, convert_frag<Elem>(acc_dk), sK, tid);
  store_frag<Kt>(gemm_dkv.mma, convert_frag<Elem>(acc_dv), sV, tid);
  Ops::sync();
  const int64_t ldk = p.heads_kv * D;
  const int64_t kv_row0 = (p.varlen() ? si.k_token0 : int64_t(b) * p.seqlen_k) + j0;
  Elem* dk = static_cast<Elem*>(bp.dk) + kv_row0 * ldk + int64_t(hk) * D;
  Elem* dv = static_cast<Elem*>(bp.dv) + kv_row0 * ldk + int64_t(hk) * D;
  Tensor gdK = make_tensor(make_gmem_ptr(dk), Shape<Int<N>, Int<D>>{}, make_stride(ldk, _1{}));
  Tensor gdV = make_tensor(make_gmem_ptr(dv), Shape<Int<N>, Int<D>>{}, make_stride(ldk, _1{}));
  store_tile<Kt>(sK, gdK, nk, tid);
  store_tile<Kt>(sV, gdV, nk, tid);
}

}  // namespace longattn::cuda::flash
