// CPU attention backward (FlashAttention-2 style, key-block major).
// Work item = (sequence, kv head, chunk of key blocks). For each key block it walks the query
// tiles the mask lets see it (one interval, see MaskParams::query_range), for every q head of
// its GQA group, recomputes P from the saved lse and accumulates dK, dV in registers-to-cache
// scratch; dQ accumulates into a per-chunk buffer. Chunks are fixed by shapes, and the dQ
// buffers are summed in chunk order, so results are deterministic without atomics.
#include <vector>

#include "cpu/attention_kernels.h"
#include "cpu/backward_rows.h"
#include "cpu/gemm.h"

namespace longattn::cpu {
namespace {

template <typename T>
struct BwdScratch {
  using A = acc_t<T>;
  std::vector<A> s, dp, g, q, dout, k, v, kt, vt, dk, dv;
  NonfiniteRows<A> q_rows, k_rows;  // in partial tiles (tile.h)
  BwdScratch(const CpuTiles& t, int64_t D, bool softcap)
      : s(t.q * t.k), dp(t.q * t.k), g(softcap ? t.q * t.k : 0), q(t.q * D), dout(t.q * D),
        k(t.k * D), v(t.k * D), kt(t.k * D), vt(t.k * D), dk(t.k * D), dv(t.k * D) {}
};

template <typename T>
void backward_item(const AttentionParams& p, const BackwardBuffers& g, const CpuTiles& tiles,
                   int64_t chunks, const WorkItem& it, BwdScratch<T>& w) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim, Hq = p.heads_q, group = p.group();
  const SeqInfo si = seq_info(p, it.b);
  const MaskParams& mask = si.mask;
  const ScoreParams& sp = p.score;
  const int64_t hk = it.h;
  const KeyBlocks blocks(mask, si.k_len, tiles.k);
  const int64_t nkb = blocks.count();
  const int64_t kb0 = nkb * it.tile / chunks, kb1 = nkb * (it.tile + 1) / chunks;
  const int64_t ldS = tiles.k;
  const int64_t ldo = Hq * D;  // dout, out and dq rows
  A* dq_base = g.dq_accum ? static_cast<A*>(g.dq_accum) + it.tile * (p.total_q * Hq * D)
                          : static_cast<A*>(g.dq);
  A* S = w.s.data();
  A* dP = w.dp.data();
  A* G = sp.softcap > 0.0 ? w.g.data() : nullptr;
  A* dK = w.dk.data();
  A* dV = w.dv.data();

  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const Range keys = blocks.block(kb);
    const int64_t j0 = keys.lo, nk = keys.size();
    const int64_t s0 = mask.k_start + j0;
    int64_t ldk, ldv;
    const A* K = load_rows<T>(static_cast<const T*>(p.k) + k_offset(p, si, it.b, hk) + j0 * p.k_row_stride,
                              p.k_row_stride, nk, D, w.k.data(), &ldk);
    const A* V = load_rows<T>(static_cast<const T*>(p.v) + v_offset(p, si, it.b, hk) + j0 * p.v_row_stride,
                              p.v_row_stride, nk, D, w.v.data(), &ldv);
    // K^T and V^T packed once per key block, reused by every query tile and GQA head.
    A* Kt = w.kt.data();
    A* Vt = w.vt.data();
    transpose<A>(K, ldk, nk, D, Kt, nk);
    transpose<A>(V, ldv, nk, D, Vt, nk);
    std::fill(dK, dK + nk * D, A(0));
    std::fill(dV, dV + nk * D, A(0));
    const Range rows = mask.query_range(j0, j0 + nk, si.q_len);
    // dQ += dS K and dK += dS^T Q in partial tiles pair masked entries (dS = 0) with K and Q
    // rows: with a non-finite one, they use the clean copies (tile.h, NonfiniteRows). A row of
    // Q that is not finite has a NaN lse, so dS (and dK) is NaN wherever it is seen; a row of
    // K can be seen with P = 0 (a -inf logit), where the dense formula's dQ has 0 * inf = NaN:
    // those dQ rows are set to NaN.
    const bool k_bad = w.k_rows.scan(K, ldk, nk, D);

    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const float slope = sp.has_alibi ? p.alibi_slopes[h] : 0.f;
      const A* lse = static_cast<const A*>(p.lse) + lse_offset(p, si, it.b, h);
      const A* delta = static_cast<const A*>(g.delta) + lse_offset(p, si, it.b, h);
      const int64_t qoff = q_offset(p, si, it.b, h), ooff = out_offset(p, si, it.b, h);
      for (int64_t i0 = rows.lo; i0 < rows.hi; i0 += tiles.q) {
        const int64_t nq = std::min(tiles.q, rows.hi - i0);
        const int64_t p0 = mask.q_start + i0;
        const TileKind kind = mask.classify(p0, p0 + nq - 1, s0, s0 + nk - 1);
        if (kind == TileKind::kEmpty) continue;
        int64_t ldq, lddo;
        const A* Q = load_rows<T>(static_cast<const T*>(p.q) + qoff + i0 * p.q_row_stride,
                                  p.q_row_stride, nq, D, w.q.data(), &ldq);
        const A* dO = load_rows<T>(static_cast<const T*>(g.dout) + ooff + i0 * ldo, ldo, nq, D,
                                   w.dout.data(), &lddo);
        const bool q_bad = kind == TileKind::kPartial && w.q_rows.scan(Q, ldq, nq, D);

        // Rows [r0, r1) against key columns [c0, c1) of the block.
        auto block = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, bool masked) {
          const int64_t n = c1 - c0, mr = r1 - r0, sf = s0 + c0;
          const GradRows<A> gr{p0, sf, lse + i0, delta + i0, sp, slope, mask, masked};
          A* Sb = S + r0 * ldS;
          A* dPb = dP + r0 * ldS;
          // P = exp(logits - lse), recomputed.
          gemm<A>(mr, n, D, Q + r0 * ldq, ldq, 1, Kt + c0, nk, false, Sb, ldS);
          probabilities_rows<A>(S, G, ldS, r0, r1, n, gr);
          // dP = dO V^T; dV += P^T dO.
          gemm<A>(mr, n, D, dO + r0 * lddo, lddo, 1, Vt + c0, nk, false, dPb, ldS);
          gemm<A>(n, D, mr, Sb, 1, ldS, dO + r0 * lddo, lddo, true, dV + c0 * D, D);
          // dS = P (dP - delta), chained through softcap and the row scale back to q.k.
          dscores_rows<A>(S, dP, G, ldS, r0, r1, n, gr);
          const bool clean_q = masked && q_bad, clean_k = masked && k_bad;
          const A* Qm = clean_q ? w.q_rows.clean.data() : Q;
          const A* Km = clean_k ? w.k_rows.clean.data() : K;
          const int64_t ldqm = clean_q ? D : ldq, ldkm = clean_k ? D : ldk;
          A* dq_rows = dq_base + ooff + (i0 + r0) * ldo;
          gemm<A>(n, D, mr, dPb, 1, ldS, Qm + r0 * ldqm, ldqm, true, dK + c0 * D, D);
          gemm<A>(mr, D, n, dPb, ldS, 1, Km + c0 * ldkm, ldkm, true, dq_rows, ldo);
          if (clean_k) {
            for (int64_t r = r0; r < r1; ++r) {
              if (w.k_rows.row_sees_bad(mask, p0 + r, s0, c0, c1))
                std::fill(dq_rows + (r - r0) * ldo, dq_rows + (r - r0) * ldo + D, A(NAN));
            }
          }
        };
        for_each_row_group(mask, kind, i0, nq, j0, nk, si.k_len, block);
      }
    }

    const int64_t kv_row = p.heads_kv * D;
    const int64_t kv_off = (p.varlen() ? si.k_token0 : it.b * p.seqlen_k) * kv_row + hk * D;
    for (int64_t r = 0; r < nk; ++r) {
      store_row<T>(dK + r * D, static_cast<T*>(g.dk) + kv_off + (j0 + r) * kv_row, D);
      store_row<T>(dV + r * D, static_cast<T*>(g.dv) + kv_off + (j0 + r) * kv_row, D);
    }
  }
}

// Keys with no visible query get zero gradients: the kernel writes only the blocks of its
// chunks, which cover every key, so nothing is left unwritten.
}  // namespace

int64_t backward_dq_chunks(const AttentionParams& p) {
  const CpuTiles t = backward_tiles(p);
  const int64_t units = std::max<int64_t>(1, p.batch * p.heads_kv);
  const int64_t max_blocks = KeyBlocks::max_count(p.seqlen_k, t.k);
  // At least ~4 key blocks per chunk: each chunk costs a zeroed dQ-sized accumulator and a
  // pass of the final reduction, which short sequences do not repay.
  int64_t chunks = std::min(ceil_div(16, units), std::max<int64_t>(1, max_blocks / 4));
  // Each chunk holds a dQ-sized accumulator: cap their memory at 512 MiB (or one dQ).
  const int64_t bytes = p.total_q * p.heads_q * p.head_dim * 8;
  while (chunks > 1 && chunks * bytes > (int64_t(512) << 20)) --chunks;
  return std::max<int64_t>(1, chunks);
}

template <typename T>
void attention_backward(const AttentionParams& p, const BackwardBuffers& g) {
  const CpuTiles tiles = backward_tiles(p);
  compute_delta<T>(p, g);
  if (g.dsink) compute_dsink<T>(p, g);
  const std::vector<WorkItem> items = key_chunk_items(p, tiles, g.dq_chunks);
  // Sequences with no queries (or no keys) still owe zero dk/dv; zero them all up front only
  // when such sequences exist would save a pass, but a memset is cheap next to the kernel.
  const int64_t kv_elems = g.total_k * p.heads_kv * p.head_dim;
  std::fill(static_cast<T*>(g.dk), static_cast<T*>(g.dk) + kv_elems, T(0));
  std::fill(static_cast<T*>(g.dv), static_cast<T*>(g.dv) + kv_elems, T(0));
  parallel_items(
      static_cast<int64_t>(items.size()),
      [&] { return BwdScratch<T>(tiles, p.head_dim, p.score.softcap > 0.0); },
      [&](int64_t i, BwdScratch<T>& w) { backward_item<T>(p, g, tiles, g.dq_chunks, items[i], w); });
  reduce_dq<T>(p, g);
}

template void attention_backward<float>(const AttentionParams&, const BackwardBuffers&);
template void attention_backward<double>(const AttentionParams&, const BackwardBuffers&);
template void attention_backward<c10::BFloat16>(const AttentionParams&, const BackwardBuffers&);
template void attention_backward<c10::Half>(const AttentionParams&, const BackwardBuffers&);

}  // namespace longattn::cpu
