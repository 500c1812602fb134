// The row steps of the CPU forward kernels (attention_fwd.cpp, and rope_attention_fwd.cpp,
// which scores the same tiles from rotated copies of q and k): the online softmax update of a
// block of score rows, the row finish, and the merge of split-K chunks.
#pragma once
#include <vector>

#include "common/merge.h"
#include "cpu/attention_kernels.h"
#include "cpu/key_split.h"
#include "cpu/parallel.h"
#include "cpu/tile.h"

namespace longattn::cpu {

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

// The running statistics of a query tile: output accumulator O (rows x D), max m, sum l.
template <typename A>
struct RunningRows {
  A* O;
  A* m;
  A* l;
  int64_t D;
};

// Rows [r0, r1) of a score tile (row stride ldS) hold raw dot products q.k for n keys from
// position sf; rows sit at positions p0 + r. They become P = exp(logit - m_new) in place and
// the rows' statistics move on (the output rescaled by exp(m_old - m_new)); the caller then
// adds P V. masked: apply `mask` per element. v_bad: the tile's V had non-finite rows, zeroed
// (tile.h): the rows that see one become NaN here. s0, c0, c1: the tile's first key position
// and the block's columns in it.
template <typename A>
void online_softmax_rows(A* S, int64_t ldS, int64_t r0, int64_t r1, int64_t n, int64_t p0,
                         int64_t sf, const ScoreParams& sp, float slope, const MaskParams& mask,
                         bool masked, const NonfiniteRows<A>* v_bad, int64_t s0, int64_t c0,
                         int64_t c1, RunningRows<A> run) {
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
    const A m_new = max_nan(run.m[r], mx);
    // A row that sees a non-finite value (zeroed in the clean V) is NaN; its lse is not.
    if (v_bad != nullptr && v_bad->row_sees_bad(mask, pos, s0, c0, c1)) {
      std::fill(run.O + r * run.D, run.O + (r + 1) * run.D, A(NAN));
    }
    if (m_new == neg_inf<A>()) {  // nothing visible yet: contribute zeros
      std::fill(x, x + n, A(0));
      continue;
    }
    const A alpha = std::exp(run.m[r] - m_new);
    const A sum = exp_sum<A>(x, n, mul, m_new);
    run.l[r] = run.l[r] * alpha + sum;
    if (alpha != A(1)) scale_row<A>(run.O + r * run.D, run.D, alpha);
    run.m[r] = m_new;
  }
}

// Finish the nq rows of a whole item (not a split chunk) into out (q's dtype, row stride
// heads_q * D) and lse: the sink logit of head h, the fully-masked-row test of `mask`.
template <typename T>
void finish_item_rows(const AttentionParams& p, const SeqInfo& si, int64_t b, int64_t h,
                      int64_t i0, int64_t nq, RunningRows<acc_t<T>> run) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim;
  T* out = static_cast<T*>(p.out) + out_offset(p, si, b, h) + i0 * p.heads_q * D;
  A* lse = static_cast<A*>(p.lse) + lse_offset(p, si, b, h) + i0;
  const ScoreParams& sp = p.score;
  const A sink_logit = sp.has_sink_logit ? static_cast<A>(p.sink_logit(h)) : neg_inf<A>();
  for (int64_t r = 0; r < nq; ++r) {
    A* o = run.O + r * D;
    const bool sees = run.m[r] == neg_inf<A>() && si.mask.row_sees_keys(i0 + r, si.k_len);
    lse[r] = finish_row<A>(run.m[r], run.l[r], o, D, sp.has_sink_logit, sink_logit, sees);
    store_row<T>(o, out + r * p.heads_q * D, D);
  }
}

// A split chunk's rows into its partial (out rows of stride D, lse without the sink logit,
// which the merge counts once).
template <typename A>
void finish_chunk_rows(int64_t nq, RunningRows<A> run, A* part_out, A* part_lse) {
  for (int64_t r = 0; r < nq; ++r) {
    A* o = run.O + r * run.D;
    part_lse[r] = finish_row<A>(run.m[r], run.l[r], o, run.D, false, A(0), false);
    std::copy(o, o + run.D, part_out + r * run.D);
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

// The forward's driver: the items of `p` (query tiles of its mask), split as key_split.h
// plans, each unit run by keys(unit, scratch, part_out, part_lse) (part_out null: a whole
// item), then the split items merged.
template <typename T, typename MakeScratch, typename Keys>
void run_forward(const AttentionParams& p, const CpuTiles& tiles, MakeScratch&& make_scratch,
                 Keys&& keys) {
  using A = acc_t<T>;
  const std::vector<WorkItem> items = query_tile_items(p, tiles);
  const ForwardPlan plan = plan_forward(p, tiles, items);
  // Linear scratch: one partial (tile rows x D, and lse) per chunk of the split items.
  std::vector<A> part_out(plan.slots * tiles.q * p.head_dim), part_lse(plan.slots * tiles.q);
  parallel_items(
      static_cast<int64_t>(plan.units.size()), make_scratch, [&](int64_t i, auto& w) {
        const ForwardUnit& u = plan.units[i];
        const bool whole = u.slot < 0;
        keys(items[u.item], u.tile_begin, u.tile_end, w,
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

}  // namespace longattn::cpu
