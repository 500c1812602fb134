// The passes and row steps of the CPU backward kernels (attention_bwd.cpp, and
// rope_attention_bwd.cpp, which scores the same tiles from rotated copies of q and k):
// delta and the sink-logit gradient before the key-block pass, P and dS of a block of score
// rows inside it, the fixed-order dQ reduction after it.
#pragma once
#include <vector>

#include "common/key_blocks.h"
#include "cpu/attention_kernels.h"
#include "cpu/parallel.h"
#include "cpu/tile.h"
#include "cpu/work_items.h"

namespace longattn::cpu {

inline CpuTiles backward_tiles(const AttentionParams& p) {
  CpuTiles t;
  t.q = std::min<int64_t>(128, std::max<int64_t>(1, p.seqlen_q));
  t.k = std::min<int64_t>(p.head_dim > 128 ? 128 : 256, std::max<int64_t>(1, p.seqlen_k));
  return t;
}

// delta_i = rowsum(dO_i * O_i) - dlse_i, for every (sequence, q head, row).
template <typename T>
void compute_delta(const AttentionParams& p, const BackwardBuffers& g) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim;
  parallel_for(p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> o(D), d(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      const SeqInfo si = seq_info(p, b);
      const int64_t off = out_offset(p, si, b, h), loff = lse_offset(p, si, b, h);
      A* delta = static_cast<A*>(g.delta) + loff;
      const A* dlse = g.dlse ? static_cast<const A*>(g.dlse) + loff : nullptr;
      for (int64_t i = 0; i < si.q_len; ++i) {
        const int64_t row = off + i * p.heads_q * D;
        int64_t ld;
        const A* oa = load_rows<T>(static_cast<const T*>(p.out) + row, D, 1, D, o.data(), &ld);
        const A* da = load_rows<T>(static_cast<const T*>(g.dout) + row, D, 1, D, d.data(), &ld);
        A acc = 0;
        for (int64_t c = 0; c < D; ++c) acc += oa[c] * da[c];
        delta[i] = acc - (dlse ? dlse[i] : A(0));
      }
    }
  });
}

// d sink_h = -sum_i P_sink_i * delta_i, summed in a fixed order per head.
template <typename T>
void compute_dsink(const AttentionParams& p, const BackwardBuffers& g) {
  using A = acc_t<T>;
  parallel_for(p.heads_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      const A z = static_cast<A>(p.sink_logit(h));
      A acc = 0;
      for (int64_t b = 0; b < p.batch; ++b) {
        const SeqInfo si = seq_info(p, b);
        const int64_t loff = lse_offset(p, si, b, h);
        const A* lse = static_cast<const A*>(p.lse) + loff;
        const A* delta = static_cast<const A*>(g.delta) + loff;
        for (int64_t i = 0; i < si.q_len; ++i) {
          if (lse[i] == neg_inf<A>()) continue;
          acc -= std::exp(z - lse[i]) * delta[i];
        }
      }
      if (p.sink_logits_fp64) {
        static_cast<double*>(g.dsink)[h] = static_cast<double>(acc);
      } else {
        static_cast<float*>(g.dsink)[h] = static_cast<float>(acc);
      }
    }
  });
}

// Work item = (sequence, kv head, chunk of key blocks), costliest first.
inline std::vector<WorkItem> key_chunk_items(const AttentionParams& p, const CpuTiles& t,
                                             int64_t chunks) {
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < p.batch; ++b) {
    const SeqInfo si = seq_info(p, b);
    const KeyBlocks blocks(si.mask, si.k_len, t.k);
    const int64_t nkb = blocks.count();
    if (si.q_len == 0 || nkb == 0) continue;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t kb0 = nkb * c / chunks, kb1 = nkb * (c + 1) / chunks;
      int64_t cost = 0;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const Range keys = blocks.block(kb);
        cost += 1 + si.mask.query_range(keys.lo, keys.hi, si.q_len).size();
      }
      if (kb1 == kb0) continue;
      for (int64_t h = 0; h < p.heads_kv; ++h) items.push_back({b, h, c, cost});
    }
  }
  sort_by_cost(items);
  return items;
}

// dq = sum over chunks of the accumulators, in chunk order.
template <typename T>
void reduce_dq(const AttentionParams& p, const BackwardBuffers& g) {
  using A = acc_t<T>;
  if (g.dq_accum == nullptr) return;
  const int64_t n = p.total_q * p.heads_q * p.head_dim;
  const A* acc = static_cast<const A*>(g.dq_accum);
  T* dq = static_cast<T*>(g.dq);
  parallel_for(n, 4096, [&](int64_t begin, int64_t end) {
    std::vector<A> tmp(end - begin);
    std::copy(acc + begin, acc + end, tmp.begin());
    for (int64_t c = 1; c < g.dq_chunks; ++c) {
      const A* src = acc + c * n + begin;
      for (int64_t i = 0; i < end - begin; ++i) tmp[i] += src[i];
    }
    store_row<T>(tmp.data(), dq + begin, end - begin);
  });
}

// The rows of a backward tile: query rows at positions p0 + r, keys from position sf, their
// lse and delta (indexed by r), the logit parameters.
template <typename A>
struct GradRows {
  int64_t p0, sf;
  const A* lse;
  const A* delta;
  const ScoreParams& sp;
  float slope;
  const MaskParams& mask;
  bool masked;
};

// Rows [r0, r1) of S (row stride ldS, n columns) hold raw dot products q.k: they become
// P = exp(logit - lse), 0 on masked pairs and on rows that see no key. G (softcap only)
// receives d(logit)/d(scaled dot).
template <typename A>
void probabilities_rows(A* S, A* G, int64_t ldS, int64_t r0, int64_t r1, int64_t n,
                        const GradRows<A>& g) {
  const ScoreParams& sp = g.sp;
  for (int64_t r = r0; r < r1; ++r) {
    A* x = S + r * ldS;
    const int64_t pos = g.p0 + r;
    const A l = g.lse[r];
    if (l == neg_inf<A>()) {  // fully masked row: no gradient
      std::fill(x, x + n, A(0));
      continue;
    }
    const RowCtx rc{pos, g.sf, sp.scale * logn_factor(pos, sp.inv_log_logn_base), g.slope};
    A mul = static_cast<A>(rc.row_scale);
    if (!sp.plain()) {
      transform_row<A>(x, n, rc, sp, G ? G + r * ldS : nullptr);
      mul = A(1);
    }
    if (g.masked) mask_row<A>(x, n, g.mask, pos, g.sf);
    exp_sum<A>(x, n, mul, l);
    // A NaN lse (a NaN row) makes exp(-inf - lse) NaN too: masked pairs stay 0.
    if (g.masked && l != l) mask_row<A>(x, n, g.mask, pos, g.sf, A(0));
  }
}

// With P in S and dP = dO V^T in dP: dS = P (dP - delta), chained through softcap (G) and
// the row scale back to q.k, in place of dP; 0 on masked pairs.
template <typename A>
void dscores_rows(const A* S, A* dP, const A* G, int64_t ldS, int64_t r0, int64_t r1, int64_t n,
                  const GradRows<A>& g) {
  const ScoreParams& sp = g.sp;
  for (int64_t r = r0; r < r1; ++r) {
    const A* pr = S + r * ldS;
    A* ds = dP + r * ldS;
    const A dr = g.lse[r] == neg_inf<A>() ? A(0) : g.delta[r];
    const A rs = static_cast<A>(sp.scale * logn_factor(g.p0 + r, sp.inv_log_logn_base));
    if (G) {
      const A* gr = G + r * ldS;
      for (int64_t j = 0; j < n; ++j) ds[j] = pr[j] * (ds[j] - dr) * gr[j] * rs;
    } else {
      for (int64_t j = 0; j < n; ++j) ds[j] = pr[j] * (ds[j] - dr) * rs;
    }
    // dP of a masked pair reads a value row the query cannot see: P = 0 times a
    // non-finite dP would be NaN. Masked pairs get dS = 0 outright.
    if (g.masked) mask_row<A>(ds, n, g.mask, g.p0 + r, g.sf, A(0));
  }
}

}  // namespace longattn::cpu
