// CPU attention forward: FlashAttention-style online softmax over score tiles.
// Work item = (sequence, q head, query tile); with few items and long key ranges each item's
// key tiles are split into chunks merged afterwards (cpu/key_split.h). For each item the mask
// yields at most two key ranges (sinks, window band); tiles inside them are classified
// full/partial/empty, empty tiles are never touched and only partial tiles pay for
// per-element masking. Score tiles
// go through BLAS (Q K^T, P V); the softmax runs on at::vec rows (cpu/forward_rows.h).
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/forward_rows.h"
#include "cpu/gemm.h"
#include "cpu/tile.h"
#include "cpu/tuning.h"

namespace longattn::cpu {

CpuTiles choose_tiles(const AttentionParams& p) {
  CpuTiles t;
  const CpuTuning tuning = cpu_tuning();  // an override of the tile shape (cpu/tuning.h)
  if (tuning.tile_q > 0 && tuning.tile_k > 0) {
    t.q = std::min<int64_t>(tuning.tile_q, std::max<int64_t>(1, p.seqlen_q));
    t.k = tuning.tile_k;
    return t;
  }
  // Short query sets (decode, chunked prefill) want the rows they have; long key sets want
  // long tiles so each BLAS call is large.
  t.q = std::min<int64_t>(128, std::max<int64_t>(1, p.seqlen_q));
  t.k = p.head_dim > 128 ? 128 : 256;
  return t;
}

namespace {

template <typename T>
struct FwdScratch {
  using A = acc_t<T>;
  std::vector<A> s, o, q, k, kt, v, m, l;
  NonfiniteRows<A> nonfinite;  // the V tile's, in partial tiles
  FwdScratch(const CpuTiles& t, int64_t D)
      : s(t.q * t.k), o(t.q * D), q(t.q * D), k(t.k * D), kt(t.k * D), v(t.k * D), m(t.q), l(t.q) {}
};

// Key tiles [tile_begin, tile_end) of one work item (sequence, q head, query tile), counted
// over its visible ranges in order (cpu/key_split.h). Without a partial the item is whole and
// goes to out/lse; with one, the chunk's (out, lse) rows go to part_out (row stride D) and
// part_lse without the sink logit, which the merge counts once.
template <typename T>
void forward_keys(const AttentionParams& p, const CpuTiles& tiles, const WorkItem& it,
                  int64_t tile_begin, int64_t tile_end, FwdScratch<T>& w, acc_t<T>* part_out,
                  acc_t<T>* part_lse) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim;
  const SeqInfo si = seq_info(p, it.b);
  const MaskParams& mask = si.mask;
  const int64_t h = it.h, hk = h / p.group();
  const int64_t i0 = it.tile * tiles.q, nq = std::min(tiles.q, si.q_len - i0);
  const int64_t ldS = tiles.k;

  const T* qp = static_cast<const T*>(p.q) + q_offset(p, si, it.b, h) + i0 * p.q_row_stride;
  const T* kp = static_cast<const T*>(p.k) + k_offset(p, si, it.b, hk);
  const T* vp = static_cast<const T*>(p.v) + v_offset(p, si, it.b, hk);
  int64_t ldq;
  const A* Q = load_rows<T>(qp, p.q_row_stride, nq, D, w.q.data(), &ldq);

  A* S = w.s.data();
  const RunningRows<A> run{w.o.data(), w.m.data(), w.l.data(), D};
  std::fill(run.O, run.O + nq * D, A(0));
  std::fill(run.m, run.m + nq, neg_inf<A>());
  std::fill(run.l, run.l + nq, A(0));

  const ScoreParams& sp = p.score;
  const float slope = sp.has_alibi ? p.alibi_slopes[h] : 0.f;
  const int64_t p0 = mask.q_start + i0, p1 = p0 + nq - 1;

  Range ranges[2];
  mask.key_ranges(i0, i0 + nq, si.k_len, &ranges[0], &ranges[1]);
  int64_t tile_index = 0;
  for (const Range& keys : ranges) {
    for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += tiles.k, ++tile_index) {
      if (tile_index < tile_begin || tile_index >= tile_end) continue;
      const int64_t nk = std::min(tiles.k, keys.hi - j0);
      const int64_t s0 = mask.k_start + j0;
      const TileKind kind = mask.classify(p0, p1, s0, s0 + nk - 1);
      if (kind == TileKind::kEmpty) continue;

      // K packed transposed so the GEMM streams rows of K^T; V is read in place when it can be.
      int64_t ldk, ldv;
      const A* K = load_rows<T>(kp + j0 * p.k_row_stride, p.k_row_stride, nk, D, w.k.data(), &ldk);
      transpose<A>(K, ldk, nk, D, w.kt.data(), nk);
      const A* V = load_rows<T>(vp + j0 * p.v_row_stride, p.v_row_stride, nk, D, w.v.data(), &ldv);
      // A partial tile's P V product pairs masked (query, key) entries, P = 0, with V rows:
      // a non-finite one there would reach rows that cannot see the key (tile.h, NonfiniteRows).
      const bool v_bad = kind == TileKind::kPartial && w.nonfinite.scan(V, ldv, nk, D);
      if (v_bad) {
        V = w.nonfinite.clean.data();
        ldv = D;
      }

      // Rows [r0, r1) against tile columns [c0, c1): S = Q K^T, online softmax, O += P V.
      auto block = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, bool masked) {
        const int64_t n = c1 - c0;
        gemm<A>(r1 - r0, n, D, Q + r0 * ldq, ldq, 1, w.kt.data() + c0, nk, false, S + r0 * ldS, ldS);
        online_softmax_rows<A>(S, ldS, r0, r1, n, p0, s0 + c0, sp, slope, mask, masked,
                               v_bad ? &w.nonfinite : nullptr, s0, c0, c1, run);
        gemm<A>(r1 - r0, D, n, S + r0 * ldS, ldS, 1, V + c0 * ldv, ldv, true, run.O + r0 * D, D);
      };

      for_each_row_group(mask, kind, i0, nq, j0, nk, si.k_len, block);
    }
  }

  if (part_out != nullptr) {
    // A chunk is one part of its rows' keys: the sink logit and the fully-masked-row test wait
    // for the merge (merge_chunks).
    finish_chunk_rows<A>(nq, run, part_out, part_lse);
    return;
  }
  finish_item_rows<T>(p, si, it.b, h, i0, nq, run);
}

}  // namespace

template <typename T>
void attention_forward(const AttentionParams& p) {
  const CpuTiles tiles = choose_tiles(p);
  run_forward<T>(
      p, tiles, [&] { return FwdScratch<T>(tiles, p.head_dim); },
      [&](const WorkItem& it, int64_t tile_begin, int64_t tile_end, FwdScratch<T>& w,
          acc_t<T>* part_out, acc_t<T>* part_lse) {
        forward_keys<T>(p, tiles, it, tile_begin, tile_end, w, part_out, part_lse);
      });
}

template void attention_forward<float>(const AttentionParams&);
template void attention_forward<double>(const AttentionParams&);
template void attention_forward<c10::BFloat16>(const AttentionParams&);
template void attention_forward<c10::Half>(const AttentionParams&);

}  // namespace longattn::cpu
