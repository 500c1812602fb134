// CPU attention forward: FlashAttention-style online softmax over score tiles.
// Work item = (sequence, q head, query tile); with few items and long key ranges each item's
// key tiles are split into chunks merged afterwards (cpu/key_split.h). For each item the mask
// yields at most two key ranges (sinks, window band); tiles inside them are classified
// full/partial/empty, empty tiles are never touched and only partial tiles pay for
// per-element masking. Score tiles
// go through BLAS (Q K^T, P V); the softmax runs on at::vec rows.
#include <vector>

#include "common/merge.h"
#include "cpu/attention_kernels.h"
#include "cpu/gemm.h"
#include "cpu/key_split.h"
#include "cpu/parallel.h"
#include "cpu/tile.h"
#include "cpu/tuning.h"
#include "cpu/work_items.h"

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

// Normalizes the accumulated row o (D values, running max m, sum l) in place and returns its
// lse, by the shared row rules (common/softmax_row.h): a learned sink logit joins the
// denominator and carries no value; a row that saw nothing gets o = 0, lse = -inf.
template <typename A>
A finish_row(A m, A l, A* o, int64_t D, bool has_sink, A sink_logit, bool sees_keys) {
  const RowFinish<A> f = finish_softmax_row<A>(m, l, has_sink, sink_logit, sees_keys);
  if (f.out_scale == A(0)) {
    std::fill(o, o + D, A(0));  // not o * 0: a NaN in o must not survive a zero weight
  } else {
    scale_row<A>(o, D, f.out_scale);
  }
  return f.lse;
}

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
  A* O = w.o.data();
  A* m = w.m.data();
  A* l = w.l.data();
  std::fill(O, O + nq * D, A(0));
  std::fill(m, m + nq, neg_inf<A>());
  std::fill(l, l + nq, A(0));

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
        const int64_t n = c1 - c0, sf = s0 + c0;
        gemm<A>(r1 - r0, n, D, Q + r0 * ldq, ldq, 1, w.kt.data() + c0, nk, false, S + r0 * ldS, ldS);
        for (int64_t r = r0; r < r1; ++r) {
          A* x = S + r * ldS;
          const int64_t pos = p0 + r;
          const RowCtx rc{pos, sf, sp.scale * logn_factor(pos, sp.inv_log_logn_base), slope};
          A mul = static_cast<A>(rc.row_scale);
          if (!sp.plain()) {
            transform_row<A>(x, n, rc, sp, nullptr);
            mul = A(1);
          }
          if (masked) mask_row<A>(x, n, mask, pos, sf);
          const A mx = row_max<A>(x, n) * mul;
          const A m_new = max_nan(m[r], mx);
          // A row that sees a non-finite value (zeroed in the clean V) is NaN; its lse is not.
          if (v_bad && w.nonfinite.row_sees_bad(mask, pos, s0, c0, c1)) {
            std::fill(O + r * D, O + (r + 1) * D, A(NAN));
          }
          if (m_new == neg_inf<A>()) {  // nothing visible yet: contribute zeros
            std::fill(x, x + n, A(0));
            continue;
          }
          const A alpha = std::exp(m[r] - m_new);
          const A sum = exp_sum<A>(x, n, mul, m_new);
          l[r] = l[r] * alpha + sum;
          if (alpha != A(1)) scale_row<A>(O + r * D, D, alpha);
          m[r] = m_new;
        }
        gemm<A>(r1 - r0, D, n, S + r0 * ldS, ldS, 1, V + c0 * ldv, ldv, true, O + r0 * D, D);
      };

      for_each_row_group(mask, kind, i0, nq, j0, nk, si.k_len, block);
    }
  }

  if (part_out != nullptr) {
    // A chunk is one part of its rows' keys: the sink logit and the fully-masked-row test wait
    // for the merge (merge_chunks).
    for (int64_t r = 0; r < nq; ++r) {
      A* o = O + r * D;
      part_lse[r] = finish_row<A>(m[r], l[r], o, D, false, A(0), false);
      std::copy(o, o + D, part_out + r * D);
    }
    return;
  }
  T* out = static_cast<T*>(p.out) + out_offset(p, si, it.b, h) + i0 * p.heads_q * D;
  A* lse = static_cast<A*>(p.lse) + lse_offset(p, si, it.b, h) + i0;
  const A sink_logit = sp.has_sink_logit ? static_cast<A>(p.sink_logit(h)) : neg_inf<A>();
  for (int64_t r = 0; r < nq; ++r) {
    A* o = O + r * D;
    const bool sees = m[r] == neg_inf<A>() && mask.row_sees_keys(i0 + r, si.k_len);
    lse[r] = finish_row<A>(m[r], l[r], o, D, sp.has_sink_logit, sink_logit, sees);
    store_row<T>(o, out + r * p.heads_q * D, D);
  }
}

// The chunks of one split item, merged per row in chunk order (common/merge.h), then finished
// by the row rules (the sink logit, the fully-masked-row test) as an unsplit row is: the
// merged row is its own softmax with max lse and sum 1.
template <typename T>
void merge_chunks(const AttentionParams& p, const CpuTiles& tiles, const WorkItem& it,
                  const SplitItem& sp_item, const acc_t<T>* part_out, const acc_t<T>* part_lse,
                  std::vector<acc_t<T>>& buf) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim, chunks = sp_item.chunks;
  const SeqInfo si = seq_info(p, it.b);
  const int64_t i0 = it.tile * tiles.q, nq = std::min(tiles.q, si.q_len - i0);
  const bool has_sink = p.score.has_sink_logit;
  const A sink_logit = has_sink ? static_cast<A>(p.sink_logit(it.h)) : A(0);
  const int n = static_cast<int>(chunks);
  buf.resize(2 * n + D);
  A* lses = buf.data();
  A* weights = lses + n;
  A* acc = weights + n;

  T* out = static_cast<T*>(p.out) + out_offset(p, si, it.b, it.h) + i0 * p.heads_q * D;
  A* lse = static_cast<A*>(p.lse) + lse_offset(p, si, it.b, it.h) + i0;
  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t c = 0; c < chunks; ++c) lses[c] = part_lse[(sp_item.first_slot + c) * tiles.q + r];
    const A merged = merge_weights<A>(lses, n, weights);
    std::fill(acc, acc + D, A(0));
    for (int64_t c = 0; c < chunks; ++c) {
      if (weights[c] == A(0)) continue;  // a chunk that saw nothing, or underflow
      const A* o = part_out + ((sp_item.first_slot + c) * tiles.q + r) * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += weights[c] * o[d];
    }
    const bool sees = merged == neg_inf<A>() && si.mask.row_sees_keys(i0 + r, si.k_len);
    lse[r] = finish_row<A>(merged, A(1), acc, D, has_sink, sink_logit, sees);
    store_row<T>(acc, out + r * p.heads_q * D, D);
  }
}

}  // namespace

template <typename T>
void attention_forward(const AttentionParams& p) {
  const CpuTiles tiles = choose_tiles(p);
  const std::vector<WorkItem> items = query_tile_items(p, tiles);
  const ForwardPlan plan = plan_forward(p, tiles, items);
  using A = acc_t<T>;
  // Linear scratch: one partial (tile rows x D, and lse) per chunk of the split items.
  std::vector<A> part_out(plan.slots * tiles.q * p.head_dim), part_lse(plan.slots * tiles.q);
  parallel_items(
      static_cast<int64_t>(plan.units.size()), [&] { return FwdScratch<T>(tiles, p.head_dim); },
      [&](int64_t i, FwdScratch<T>& w) {
        const ForwardUnit& u = plan.units[i];
        const bool whole = u.slot < 0;
        forward_keys<T>(p, tiles, items[u.item], u.tile_begin, u.tile_end, w,
                        whole ? nullptr : part_out.data() + u.slot * tiles.q * p.head_dim,
                        whole ? nullptr : part_lse.data() + u.slot * tiles.q);
      });
  // The merge reads each partial once. A parallel region costs tens of microseconds (a
  // scheduler tick when the other cores are busy), so a small merge stays on this thread.
  const int64_t merge_reads = plan.slots * tiles.q * p.head_dim;
  auto merge = [&](int64_t i, std::vector<A>& buf) {
    const SplitItem& s = plan.split[i];
    merge_chunks<T>(p, tiles, items[s.item], s, part_out.data(), part_lse.data(), buf);
  };
  const int64_t n_split = static_cast<int64_t>(plan.split.size());
  if (merge_reads >= (int64_t(1) << 20)) {
    parallel_items(n_split, [] { return std::vector<A>(); }, merge);
  } else {
    std::vector<A> buf;
    for (int64_t i = 0; i < n_split; ++i) merge(i, buf);
  }
}

template void attention_forward<float>(const AttentionParams&);
template void attention_forward<double>(const AttentionParams&);
template void attention_forward<c10::BFloat16>(const AttentionParams&);
template void attention_forward<c10::Half>(const AttentionParams&);

}  // namespace longattn::cpu
