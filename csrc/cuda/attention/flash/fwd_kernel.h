// The tensor-core attention forward (FlashAttention-2 structure, longattn semantics).
//
// One CTA = (query tile of kBlockM rows, q head, sequence). The mask gives the query tile at
// most two key-index ranges (sink keys, window band: MaskParams::key_ranges); key tiles of
// kBlockN keys walk each range from its start, the last one cut at the range end (nk < kBlockN
// valid columns). Every tile is classified on positions: empty tiles are skipped, full tiles
// run unmasked, partial tiles mask per element. Rows past the sequence and keys past nk are
// zero-filled in shared memory and never stored.
//
// Per key tile (K tile t already in flight):
//   wait K_t, barrier | issue V_t | S = Q K_t^T | logits, mask | wait V_t, barrier |
//   issue K_{t+1} | online softmax | O += P V_t
// so V_t loads under the QK^T MMAs and K_{t+1} under the softmax and PV MMAs, with one K and
// one V buffer. Q stays in shared memory (ldmatrix per k-slice); O is staged through Q's
// buffer and written with 16-byte stores.
#pragma once
#include <cute/tensor.hpp>

#include "common/attention_params.h"
#include "cuda/attention/key_tiles.h"
#include "cuda/attention/flash/fwd_softmax.h"
#include "cuda/attention/flash/mma_utils.h"
#include "cuda/attention/flash/nonfinite.h"
#include "cuda/attention/flash/score_tile.h"

namespace longattn::cuda::flash {

// cp.async rows [0, rows) of a (tile rows x head dim) global tile into shared memory through a
// thread's copy partitions; rows at or past `rows` are zero-filled (plain stores: those
// addresses are not the target of any copy in flight).
template <class TiledCopy, class Src, class Dst, class Coords>
__device__ __forceinline__ void load_tile_rows(const TiledCopy& tiled_copy, const Src& src, Dst& dst,
                                               const Coords& coords, int rows) {
  using namespace cute;
#pragma unroll
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coords(0, m, 0)) < rows) {
#pragma unroll
      for (int k = 0; k < size<2>(src); ++k) copy(tiled_copy, src(_, m, k), dst(_, m, k));
    } else {
      clear(dst(_, m, _));
    }
  }
}

// One CTA's work: query tile m_block of q head h in sequence b, as thread `thread` of the CTA
// (fwd_launch.h's kernel, or the host emulator). kPlainLogits: ScoreParams::plain() (no
// softcap, no ALiBi), the common case; the other instantiation carries the logit transform,
// whose registers would otherwise cost the plain path spills.
template <class Tr, bool kPlainLogits>
__device__ __forceinline__ void forward_query_tile(const AttentionParams& p, int m_block, int64_t h,
                                                   int64_t b, unsigned char* smem_raw, int thread) {
  using namespace cute;
  using Element = typename Tr::Element;
  using Ops = typename Tr::Ops;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kHeadDim = Tr::kHeadDim;

  const SeqInfo si = seq_info(p, b);
  const int64_t i0 = static_cast<int64_t>(m_block) * kBlockM;
  if (i0 >= si.q_len) return;  // varlen: shorter sequence than the grid's maximum
  const int nq = static_cast<int>(min64(kBlockM, si.q_len - i0));
  const int64_t hk = h / p.group();
  const KeyTiles<kBlockN> tiles(si.mask, i0, nq, si.k_len);
  // window/sinks/causal/k_start as given; q_start lives in tiles.p0 (and the p0 below).
  const MaskParams& mask = p.mask;

  // ---- shared memory: Q (later O), one K tile, one V tile ----
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem + Tr::kSmemQElems), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem + Tr::kSmemQElems + Tr::kSmemKVElems),
                          typename Tr::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Tr::SmemLayoutVt{});
  Tensor sVtShape = make_tensor(sV.data(), typename Tr::SmemLayoutVtShape{});

  // ---- global tiles (int64 offsets; head dim contiguous) ----
  const Element* q_ptr = static_cast<const Element*>(p.q) + q_offset(p, si, b, h) + i0 * p.q_row_stride;
  const Element* k_ptr = static_cast<const Element*>(p.k) + k_offset(p, si, b, hk);
  const Element* v_ptr = static_cast<const Element*>(p.v) + v_offset(p, si, b, hk);
  Tensor gQ = make_tensor(make_gmem_ptr(q_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                          make_stride(p.q_row_stride, _1{}));
  // K and V at key 0; each tile moves the partition's base by j0 rows.
  Tensor gK = make_tensor(make_gmem_ptr(k_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                          make_stride(p.k_row_stride, _1{}));
  Tensor gV = make_tensor(make_gmem_ptr(v_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                          make_stride(p.v_row_stride, _1{}));

  typename Tr::GmemLoad gmem_load;
  auto gload = gmem_load.get_thread_slice(thread);
  Tensor tQg = gload.partition_S(gQ);
  Tensor tQs = gload.partition_D(sQ);
  Tensor tKg = gload.partition_S(gK);
  Tensor tKs = gload.partition_D(sK);
  Tensor tVg = gload.partition_S(gV);
  Tensor tVs = gload.partition_D(sV);
  Tensor tQc = gload.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKVc = gload.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  const auto load_k = [&](int j0, int nk) {
    Tensor src = make_tensor(tKg.data() + j0 * p.k_row_stride, tKg.layout());
    load_tile_rows(gmem_load, src, tKs, tKVc, nk);
  };
  const auto load_v = [&](int j0, int nk) {
    Tensor src = make_tensor(tVg.data() + j0 * p.v_row_stride, tVg.layout());
    load_tile_rows(gmem_load, src, tVs, tKVc, nk);
  };

  // ---- MMA partitions ----
  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(thread);
  Tensor rQ = thr_mma.partition_fragment_A(sQ);         // (MMA, MMA_M, MMA_K)
  Tensor rK = thr_mma.partition_fragment_B(sK);         // (MMA, MMA_N, MMA_K)
  Tensor rVt = thr_mma.partition_fragment_B(sVtShape);  // (MMA, MMA_N = head dim, MMA_K = keys)
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);

  auto copy_q = make_tiled_copy_A(typename Tr::SmemCopyQK{}, mma);
  auto copy_k = make_tiled_copy_B(typename Tr::SmemCopyQK{}, mma);
  auto copy_vt = make_tiled_copy_B(typename Tr::SmemCopyVt{}, mma);
  Tensor ldsm_q = copy_q.get_thread_slice(thread).partition_S(sQ);
  Tensor ldsm_k = copy_k.get_thread_slice(thread).partition_S(sK);
  Tensor ldsm_vt = copy_vt.get_thread_slice(thread).partition_S(sVt);

  // Tile coordinates (query row, key column) of this thread's score and output entries.
  Tensor coord_s = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor coord_s_rc = make_tensor(coord_s.data(), acc_rowcol_layout(coord_s.layout()));
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(coord_s_rc))::value;

  // ---- per-row score constants ----
  const ScoreParams& sp = p.score;
  const float softcap = static_cast<float>(sp.softcap);
  const bool alibi = sp.has_alibi;
  const float slope = alibi ? p.alibi_slopes[h] : 0.f;
  const int64_t p0 = tiles.p0;
  float row_scale[kRows];
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    const int64_t pos = p0 + get<0>(coord_s_rc(mi, 0));
    // The CPU kernel's row scale: scale * logn(p) in double, rounded once to fp32.
    row_scale[mi] = static_cast<float>(sp.scale * logn_factor(pos, sp.inv_log_logn_base));
  }
  OnlineSoftmax<kRows, Ops> softmax(row_scale, kPlainLogits);

  // ---- prologue: Q and the first visible K tile ----
  load_tile_rows(gmem_load, tQg, tQs, tQc, nq);
  Ops::cp_async_fence();
  int t = tiles.next_visible(mask, 0);
  if (t < tiles.count) {
    int j0, nk;
    tiles.at(t, &j0, &nk);
    load_k(j0, nk);
  }
  Ops::cp_async_fence();

  // ---- main loop over visible key tiles ----
  while (t < tiles.count) {
    int j0, nk;
    tiles.at(t, &j0, &nk);
    const TileKind kind = tiles.kind(mask, j0, nk);
    const int64_t s0 = mask.k_start + j0;

    Ops::template cp_async_wait<0>();
    Ops::sync();  // K_t (and Q) landed for all threads; everyone is done with V_{t-1}
    load_v(j0, nk);
    Ops::cp_async_fence();

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_smem_smem(acc_s, rQ, rK, ldsm_q, ldsm_k, mma, copy_q, copy_k, thread);

    Tensor s_rc = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    if constexpr (!kPlainLogits) {
      transform_scores(s_rc, coord_s_rc, row_scale, softcap, alibi, slope, p0, s0);
    }
    const bool partial = kind != TileKind::kFull || nk < kBlockN;
    if (partial) mask_scores(s_rc, coord_s_rc, TileMask(mask, p0, s0, nk));

    Ops::template cp_async_wait<0>();
    // V_t landed for all threads; everyone is done reading K_t. A partial tile's P V pairs
    // masked entries (P = 0) with V rows, so its V is scanned (this thread's own copies, landed
    // for it at the wait) and the barrier tells whether any thread found a NaN or an infinity.
    bool v_bad = false;
    if (partial) {
      v_bad = Ops::sync_or(share_has_nonfinite(tVs)) != 0;
    } else {
      Ops::sync();
    }
    const int t_next = tiles.next_visible(mask, t + 1);
    if (t_next < tiles.count) {
      int j0_next, nk_next;
      tiles.at(t_next, &j0_next, &nk_next);
      load_k(j0_next, nk_next);
    }
    Ops::cp_async_fence();

    softmax.update(s_rc, acc_o_rc);
    Tensor probs = convert_fragment<Element>(acc_s);
    Tensor probs_a = make_tensor(probs.data(), acc_as_a_layout(probs.layout()));
    if (v_bad) {
      // Rows that see a non-finite V row are NaN (their lse stays finite); then the GEMM runs
      // on V with its non-finite values zeroed, so they reach no other row (nonfinite.h).
      nan_rows_seeing_nonfinite<Ops, kBlockN>(acc_o_rc, coord_s_rc, sV, TileMask(mask, p0, s0, nk), thread % 32);
      Ops::sync();  // the scan of V is done everywhere
      zero_share_nonfinite(tVs);
      Ops::sync();
    }
    gemm_reg_smem(acc_o, probs_a, rVt, ldsm_vt, mma, copy_vt, thread);
    t = t_next;
  }

  // ---- epilogue: normalize, lse, O through shared memory ----
  const float sink = sp.has_sink_logit ? static_cast<float>(p.sink_logit(h)) : 0.f;
  float lse[kRows];
  softmax.finish(acc_o_rc, sp.has_sink_logit, sink, lse, [&](int mi) {
    return si.mask.row_sees_keys(i0 + get<0>(coord_s_rc(mi, 0)), si.k_len);
  });

  // Lane 0 of each quad writes the lse of its rows (the quad holds the same rows).
  if (get<1>(coord_s_rc(0, 0)) == 0) {
    float* lse_ptr = static_cast<float*>(p.lse) + lse_offset(p, si, b, h) + i0;
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      const int r = get<0>(coord_s_rc(mi, 0));
      if (r < nq) lse_ptr[r] = lse[mi];
    }
  }

  Tensor out16 = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(sQ.data(), typename Tr::SmemLayoutO{});
  auto copy_o = make_tiled_copy_C(typename Tr::SmemCopyO{}, mma);
  auto sthr_o = copy_o.get_thread_slice(thread);
  Tensor out16_src = sthr_o.retile_S(out16);
  Tensor out16_dst = sthr_o.partition_D(sO);
  Ops::template cp_async_wait<0>();
  Ops::sync();  // no copy into Q's buffer in flight (no visible tile: Q was never waited)
  copy(copy_o, out16_src, out16_dst);
  Ops::sync();

  const int64_t out_row_stride = p.heads_q * kHeadDim;
  Element* o_ptr = static_cast<Element*>(p.out) + out_offset(p, si, b, h) + i0 * out_row_stride;
  Tensor gO = make_tensor(make_gmem_ptr(o_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                          make_stride(out_row_stride, _1{}));
  typename Tr::GmemStore gmem_store;
  auto gstore = gmem_store.get_thread_slice(thread);
  Tensor tOs = gstore.partition_S(sO);
  Tensor tOg = gstore.partition_D(gO);
  Tensor tOc = gstore.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
#pragma unroll
  for (int m = 0; m < size<1>(tOg); ++m) {
    if (get<0>(tOc(0, m, 0)) < nq) {
#pragma unroll
      for (int k = 0; k < size<2>(tOg); ++k) copy(gmem_store, tOs(_, m, k), tOg(_, m, k));
    }
  }
}

}  // namespace longattn::cuda::flash
