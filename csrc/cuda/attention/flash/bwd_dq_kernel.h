// Deterministic-mode dQ kernel body: one CTA per (query block, q head, sequence), query-major,
// no atomics. Q, dO and the rows' lse / delta stay put while the CTA walks the key blocks the
// rows can see (MaskParams::key_ranges: the sink keys, then the window band), recomputing
// S, P, dP and dS per block (the dK/dV kernel did the same work; this is the price of
// determinism) and accumulating dQ = dS K in fp32 registers; dQ is written once.
//
// K is double-buffered (the next block's K loads during this block); V is reloaded as soon as
// dP no longer needs it.
#pragma once
#include "cuda/attention/flash/bwd_scores.h"
#include "cuda/attention/flash/bwd_traits.h"
#include "cuda/attention/flash/nonfinite.h"

namespace longattn::cuda::flash {

template <class Kt, bool kSoftcap>
BWD_DEVICE void dq_block(const BwdParams& bp, char* smem, int m_block, int h, int b, int tid) {
  using Elem = typename Kt::Elem;
  using Ops = typename Kt::Ops;
  constexpr int M = Kt::kBlockM, N = Kt::kBlockN, D = Kt::kHeadDim;
  const AttentionParams& p = bp.p;
  const SeqInfo si = seq_info(p, b);
  const MaskParams& mask = si.mask;
  const int64_t i0 = int64_t(m_block) * M;
  if (i0 >= si.q_len) return;
  const int nq = static_cast<int>(min64(M, si.q_len - i0));
  const int hk = static_cast<int>(h / p.group());

  // Key blocks (aligned to N): those of the sink range, then those of the band not already
  // listed (the two ranges are disjoint and the sinks come first).
  Range sink, band;
  mask.key_ranges(i0, i0 + nq, si.k_len, &sink, &band);
  int a_lo = 0, a_hi = 0, b_lo = 0, b_hi = 0;
  if (!sink.empty()) {
    a_lo = static_cast<int>(sink.lo / N);
    a_hi = static_cast<int>(ceil_div(sink.hi, N));
  }
  if (!band.empty()) {
    b_lo = static_cast<int>(max64(band.lo / N, a_hi));
    b_hi = static_cast<int>(ceil_div(band.hi, N));
  }
  const int n_a = a_hi - a_lo;
  const int n_list = n_a + static_cast<int>(max64(0, b_hi - b_lo));
  auto block_at = [&](int idx) { return idx < n_a ? a_lo + idx : b_lo + (idx - n_a); };
  auto geom = [&](int idx) { return tile_geom<M, N>(si, i0, int64_t(block_at(idx)) * N); };
  auto next_block = [&](int idx) {
    while (idx < n_list && geom(idx).empty) ++idx;
    return idx;
  };

  // Shared memory: Q | dO | K[2] | V | dS.
  Elem* const s_q = reinterpret_cast<Elem*>(smem);
  Elem* const s_do = s_q + Kt::kQElems;
  Elem* const s_k = s_do + Kt::kQElems;
  Elem* const s_v = s_k + 2 * Kt::kKElems;
  Elem* const s_ds = s_v + Kt::kKElems;
  Tensor sQ = make_tensor(make_smem_ptr(s_q), typename Kt::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(s_do), typename Kt::SmemLayoutQ{});
  Tensor sV = make_tensor(make_smem_ptr(s_v), typename Kt::SmemLayoutK{});
  Tensor sdS = make_tensor(make_smem_ptr(s_ds), typename Kt::SmemLayoutS{});
  auto smem_k = [&](int buf) { return make_tensor(make_smem_ptr(s_k + buf * Kt::kKElems), typename Kt::SmemLayoutK{}); };
  auto smem_kt = [&](int buf) { return make_tensor(make_smem_ptr(s_k + buf * Kt::kKElems), typename Kt::SmemLayoutKt{}); };

  const Elem* k_head = static_cast<const Elem*>(p.k) + k_offset(p, si, b, hk);
  const Elem* v_head = static_cast<const Elem*>(p.v) + v_offset(p, si, b, hk);
  auto load_k = [&](int n, int buf) {
    Tensor sK = smem_k(buf);
    load_tile<Kt>(make_tensor(make_gmem_ptr(k_head + int64_t(n) * N * p.k_row_stride), Shape<Int<N>, Int<D>>{},
                              make_stride(p.k_row_stride, _1{})),
                  sK, static_cast<int>(min64(N, si.k_len - int64_t(n) * N)), tid);
  };
  auto load_v = [&](int n) {
    load_tile<Kt>(make_tensor(make_gmem_ptr(v_head + int64_t(n) * N * p.v_row_stride), Shape<Int<N>, Int<D>>{},
                              make_stride(p.v_row_stride, _1{})),
                  sV, static_cast<int>(min64(N, si.k_len - int64_t(n) * N)), tid);
  };

  const int64_t ldo = p.heads_q * D;
  const Elem* q = static_cast<const Elem*>(p.q) + q_offset(p, si, b, h) + i0 * p.q_row_stride;
  const Elem* dout = static_cast<const Elem*>(bp.dout) + out_offset(p, si, b, h) + i0 * ldo;
  load_tile<Kt>(make_tensor(make_gmem_ptr(q), Shape<Int<M>, Int<D>>{}, make_stride(p.q_row_stride, _1{})), sQ, nq, tid);
  load_tile<Kt>(make_tensor(make_gmem_ptr(dout), Shape<Int<M>, Int<D>>{}, make_stride(ldo, _1{})), sdO, nq, tid);
  int idx = next_block(0);
  if (idx < n_list) {
    load_k(block_at(idx), 0);
    load_v(block_at(idx));
  }
  Ops::cp_async_fence();

  const SmemGemm<typename Kt::TiledMmaSdP, typename Kt::SmemCopyAtom, typename Kt::SmemCopyAtom> gemm_sdp(tid);
  const SmemGemm<typename Kt::TiledMmadQ, typename Kt::SmemCopyAtom, typename Kt::SmemCopyAtomT> gemm_dq(tid);

  const auto cS = acc_coords<typename Kt::TiledMmaSdP, M, N>(tid);
  constexpr int kRows = decltype(size<0>(cS))::value;
  TileRows<kRows> rw;
  {
    TileGeom rows_only;
    rows_only.i0 = i0;
    rows_only.nq = nq;
    const int64_t loff = lse_offset(p, si, b, h) + i0;
    load_tile_rows(rw, cS, static_cast<const float*>(p.lse) + loff, bp.delta + loff, si, rows_only,
                   p.score.inv_log_logn_base);
  }
  const float slope = p.score.has_alibi ? p.alibi_slopes[h] : 0.f;

  Tensor acc_dq = partition_fragment_C(typename Kt::TiledMmadQ{}, Shape<Int<M>, Int<D>>{});
  clear(acc_dq);
  const auto gmem_thr = typename Kt::GmemLoad{}.get_thread_slice(tid);

  int buf = 0;
  while (idx < n_list) {
    const TileGeom tg = geom(idx);
    const int nxt = next_block(idx + 1);
    if (nxt < n_list) {
      load_k(block_at(nxt), buf ^ 1);  // last read by the previous block, before its last sync
      Ops::cp_async_fence();
      Ops::template cp_async_wait<1>();
    } else {
      Ops::template cp_async_wait<0>();
    }
    // dQ += dS K pairs masked entries (dS = 0) with K rows: a masked block scans its K (this
    // thread's copies, landed for it at the wait), and the barrier tells whether any thread
    // found a NaN or an infinity.
    Tensor k_share = gmem_thr.partition_D(smem_k(buf));
    bool k_bad = false;
    if (tg.masked) {
      k_bad = Ops::sync_or(share_has_nonfinite(k_share)) != 0;
    } else {
      Ops::sync();
    }

    Tensor acc_s = partition_fragment_C(typename Kt::TiledMmaSdP{}, Shape<Int<M>, Int<N>>{});
    Tensor gcap = make_tensor<SoftcapGrad>(acc_rowcol(acc_s.layout()));  // softcap only
    tile_probs<kSoftcap>(gemm_sdp, acc_s, gcap, sQ, smem_k(buf), cS, rw, bp, si, tg, slope);
    Tensor acc_dp = partition_fragment_C(typename Kt::TiledMmaSdP{}, Shape<Int<M>, Int<N>>{});
    tile_dscores<kSoftcap>(gemm_sdp, acc_dp, acc_s, gcap, sdO, sV, rw, tg);
    Ops::sync();  // every warp is done with sV
    if (nxt < n_list) {
      load_v(block_at(nxt));
      Ops::cp_async_fence();
    }
    store_frag<Kt>(gemm_sdp.mma, convert_frag<Elem>(acc_dp), sdS, tid);
    if (k_bad) {
      // S came from the raw K; the rows that see a non-finite key are NaN (the dense formula
      // has 0 * inf there even where P = 0), and the dQ product runs on K with its non-finite
      // values zeroed, so they reach no other row. The buffer is reloaded for a later block.
      Tensor cdq = typename Kt::TiledMmadQ{}.get_thread_slice(tid).partition_C(
          make_identity_tensor(Shape<Int<M>, Int<D>>{}));
      const int64_t p0 = mask.q_start + i0, s0 = mask.k_start + tg.j0;
      Tensor acc_dq_rc = make_tensor(acc_dq.data(), acc_rowcol(acc_dq.layout()));
      nan_rows_seeing_nonfinite<Ops, N>(acc_dq_rc, make_tensor(cdq.data(), acc_rowcol(cdq.layout())), smem_k(buf),
                                        TileMask(mask, p0, s0, tg.nk), tid % 32);
      Ops::sync();  // every warp is done scanning K
      zero_share_nonfinite(k_share);
    }
    Ops::sync();

    gemm_dq.run(acc_dq, sdS, smem_kt(buf));
    Ops::sync();  // sdS and this K buffer are free again
    buf ^= 1;
    idx = nxt;
  }

  // Epilogue: dQ (scaled by the softmax scale) through the Q buffer to 16-byte stores. Rows
  // that see no key get zeros.
  Ops::template cp_async_wait<0>();
  Ops::sync();
#pragma unroll
  for (int i = 0; i < size(acc_dq); ++i) acc_dq(i) *= bp.scale;
  store_frag<Kt>(gemm_dq.mma, convert_frag<Elem>(acc_dq), sQ, tid);
  Ops::sync();
  Elem* dq = static_cast<Elem*>(bp.dq) + out_offset(p, si, b, h) + i0 * ldo;
  Tensor gdQ = make_tensor(make_gmem_ptr(dq), Shape<Int<M>, Int<D>>{}, make_stride(ldo, _1{}));
  store_tile<Kt>(sQ, gdQ, nq, tid);
}

}  // namespace longattn::cuda::flash
