// CPU attention forward: FlashAttention-style online softmax over score tiles.
// Work item = (sequence, q head, query tile). For each item the mask yields at most two key
// ranges (sinks, window band); tiles inside them are classified full/partial/empty, empty
// tiles are never touched and only partial tiles pay for per-element masking. Score tiles
// go through BLAS (Q K^T, P V); the softmax runs on at::vec rows.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/gemm.h"
#include "cpu/parallel.h"
#include "cpu/tile.h"
#include "cpu/work_items.h"

namespace longattn::cpu {

CpuTiles choose_tiles(const AttentionParams& p) {
  CpuTiles t;
  // Tuning knob: LONGATTN_CPU_TILES="q,k" overrides the forward tile shape.
  if (const char* env = std::getenv("LONGATTN_CPU_TILES")) {
    long tq = 0, tk = 0;
    if (std::sscanf(env, "%ld,%ld", &tq, &tk) == 2 && tq > 0 && tk > 0) {
      t.q = std::min<int64_t>(tq, std::max<int64_t>(1, p.seqlen_q));
      t.k = tk;
      return t;
    }
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
  FwdScratch(const CpuTiles& t, int64_t D)
      : s(t.q * t.k), o(t.q * D), q(t.q * D), k(t.k * D), kt(t.k * D), v(t.k * D), m(t.q), l(t.q) {}
};

template <typename T>
void forward_item(const AttentionParams& p, const CpuTiles& tiles, const WorkItem& it,
                  FwdScratch<T>& w) {
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
  for (const Range& keys : ranges) {
    for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += tiles.k) {
      const int64_t nk = std::min(tiles.k, keys.hi - j0);
      const int64_t s0 = mask.k_start + j0;
      const TileKind kind = mask.classify(p0, p1, s0, s0 + nk - 1);
      if (kind == TileKind::kEmpty) continue;

      // K packed transposed so the GEMM streams rows of K^T; V is read in place when it can be.
      int64_t ldk, ldv;
      const A* K = load_rows<T>(kp + j0 * p.k_row_stride, p.k_row_stride, nk, D, w.k.data(), &ldk);
      transpose<A>(K, ldk, nk, D, w.kt.data(), nk);
      const A* V = load_rows<T>(vp + j0 * p.v_row_stride, p.v_row_stride, nk, D, w.v.data(), &ldv);

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
          const A m_new = std::max(m[r], mx);
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

  T* out = static_cast<T*>(p.out) + out_offset(p, si, it.b, h) + i0 * p.heads_q * D;
  A* lse = static_cast<A*>(p.lse) + lse_offset(p, si, it.b, h) + i0;
  const A sink_logit = sp.has_sink_logit ? static_cast<A>(p.sink_logit(h)) : neg_inf<A>();
  for (int64_t r = 0; r < nq; ++r) {
    A mr = m[r], lr = l[r];
    A* o = O + r * D;
    if (sp.has_sink_logit) {  // the sink joins the denominator and carries no value
      const A m_new = std::max(mr, sink_logit);
      const A alpha = mr == neg_inf<A>() ? A(0) : std::exp(mr - m_new);
      lr = lr * alpha + std::exp(sink_logit - m_new);
      if (alpha != A(1)) scale_row<A>(o, D, alpha);
      mr = m_new;
    }
    T* dst = out + r * p.heads_q * D;
    if (lr == A(0) || mr == neg_inf<A>()) {  // fully masked row
      std::fill(o, o + D, A(0));
      store_row<T>(o, dst, D);
      lse[r] = neg_inf<A>();
      continue;
    }
    scale_row<A>(o, D, A(1) / lr);
    store_row<T>(o, dst, D);
    lse[r] = mr + std::log(lr);
  }
}

}  // namespace

template <typename T>
void attention_forward(const AttentionParams& p) {
  const CpuTiles tiles = choose_tiles(p);
  const std::vector<WorkItem> items = query_tile_items(p, tiles);
  parallel_items(
      static_cast<int64_t>(items.size()), [&] { return FwdScratch<T>(tiles, p.head_dim); },
      [&](int64_t i, FwdScratch<T>& w) { forward_item<T>(p, tiles, items[i], w); });
}

template void attention_forward<float>(const AttentionParams&);
template void attention_forward<double>(const AttentionParams&);
template void attention_forward<c10::BFloat16>(const AttentionParams&);
template void attention_forward<c10::Half>(const AttentionParams&);

}  // namespace longattn::cpu
