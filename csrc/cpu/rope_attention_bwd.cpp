// CPU backward of rope_attention: attention's backward (cpu/attention_bwd.cpp: key-block major
// items, P and dS recomputed from lse, dQ per chunk reduced in a fixed order) over the union
// of the remap's visible pairs, through the rotations. With q_n, k_n the rows rotated on the
// near side and q_f, k_f on the far side (common/remap.h), each pair's score is one of
// <q_n, k_n> and <q_f, k_f>, so dS splits into dS_n (near pairs) and dS_f (far pairs) and
//     dq = R_qn^T (dS_n K_n) + R_qf^T (dS_f K_f),   dk = R_kn^T (dS_n^T Q_n) + R_kf^T (dS_f^T Q_f).
// A key block keeps dK_n and dK_f in the rotated frames over its query tiles and rotates them
// back once; a query tile's dS K products are rotated back as they are added to dQ. The far
// columns of a row are those before its first near key, as in the forward.
#include <vector>

#include "cpu/backward_rows.h"
#include "cpu/gemm.h"
#include "cpu/rope_attention_kernels.h"
#include "cpu/rotate_rows.h"

namespace longattn::cpu {
namespace {

// Rows per group of a block holding both sides: each side's columns are trimmed to the hull
// of the group's rows, which overlap by the group's height.
constexpr int64_t kSideRows = 32;

// Rows [r0, r1) of a block and, per side, the columns [lo, hi) they take.
struct SideGroup {
  int64_t r0, r1, lo[2], hi[2];
};

template <typename T>
struct RopeBwdScratch {
  using A = acc_t<T>;
  std::vector<A> s, s_far, dp, g, q_in, dout, k_in, v, vt, dv, dq_tile, dk_row;
  std::vector<A> q[2], k[2], kt[2], dk[2];  // per side
  NonfiniteRows<A> q_rows[2], k_rows[2];    // in partial tiles (tile.h)
  std::vector<SideGroup> groups;
  RopeBwdScratch(const CpuTiles& t, int64_t D, bool softcap, bool far)
      : s(t.q * t.k), s_far(far ? t.q * t.k : 0), dp(t.q * t.k), g(softcap ? t.q * t.k : 0),
        q_in(t.q * D), dout(t.q * D), k_in(t.k * D), v(t.k * D), vt(t.k * D), dv(t.k * D),
        dq_tile(t.q * D), dk_row(D) {
    for (int side = 0; side < (far ? 2 : 1); ++side) {
      q[side].resize(t.q * D);
      k[side].resize(t.k * D);
      kt[side].resize(t.k * D);
      dk[side].resize(t.k * D);
    }
  }
};

template <typename T>
void rope_backward_item(const RopeAttentionParams& rp, const RotationTables<acc_t<T>>& tab,
                        const BackwardBuffers& g, const CpuTiles& tiles, int64_t chunks,
                        const WorkItem& it, RopeBwdScratch<T>& w) {
  using A = acc_t<T>;
  const AttentionParams& p = rp.attn;
  const int64_t D = p.head_dim, Hq = p.heads_q, group = p.group();
  const SeqInfo si = seq_info(p, it.b);
  const MaskParams& mask = si.mask;  // the union of near and far
  const RemapMask remap = rp.remap_mask(si);
  const bool ilv = rp.rot.interleaved;
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
  A* dV = w.dv.data();

  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const Range keys = blocks.block(kb);
    const int64_t j0 = keys.lo, nk = keys.size();
    const int64_t s0 = mask.k_start + j0;
    int64_t ldk_in, ldv;
    const A* K_in = load_rows<T>(static_cast<const T*>(p.k) + k_offset(p, si, it.b, hk) + j0 * p.k_row_stride,
                                 p.k_row_stride, nk, D, w.k_in.data(), &ldk_in);
    const A* V = load_rows<T>(static_cast<const T*>(p.v) + v_offset(p, si, it.b, hk) + j0 * p.v_row_stride,
                              p.v_row_stride, nk, D, w.v.data(), &ldv);
    A* Vt = w.vt.data();
    transpose<A>(V, ldv, nk, D, Vt, nk);
    std::fill(dV, dV + nk * D, A(0));
    // K rotated (and K^T packed) once per key block and side, when a tile first needs it.
    bool k_ready[2] = {false, false}, k_bad[2] = {false, false};
    auto key_side = [&](int side) {
      if (!k_ready[side]) {
        rotate_rows<A>(K_in, ldk_in, nk, tab.k[side], tab.k_row(si, j0), ilv, D, w.k[side].data());
        transpose<A>(w.k[side].data(), D, nk, D, w.kt[side].data(), nk);
        std::fill(w.dk[side].begin(), w.dk[side].begin() + nk * D, A(0));
        k_bad[side] = w.k_rows[side].scan(w.k[side].data(), D, nk, D);
        k_ready[side] = true;
      }
    };
    const Range rows = mask.query_range(j0, j0 + nk, si.q_len);

    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const A* lse = static_cast<const A*>(p.lse) + lse_offset(p, si, it.b, h);
      const A* delta = static_cast<const A*>(g.delta) + lse_offset(p, si, it.b, h);
      const int64_t qoff = q_offset(p, si, it.b, h), ooff = out_offset(p, si, it.b, h);
      for (int64_t i0 = rows.lo; i0 < rows.hi; i0 += tiles.q) {
        const int64_t nq = std::min(tiles.q, rows.hi - i0);
        const int64_t p0 = mask.q_start + i0;
        const TileSides sides = remap.classify(p0, p0 + nq - 1, s0, s0 + nk - 1);
        if (sides.kind == TileKind::kEmpty) continue;
        int64_t ldq_in, lddo;
        const A* Q_in = load_rows<T>(static_cast<const T*>(p.q) + qoff + i0 * p.q_row_stride,
                                     p.q_row_stride, nq, D, w.q_in.data(), &ldq_in);
        const A* dO = load_rows<T>(static_cast<const T*>(g.dout) + ooff + i0 * ldo, ldo, nq, D,
                                   w.dout.data(), &lddo);
        bool q_bad[2] = {false, false};
        for (int side = 0; side < 2; ++side) {
          if (!(side == 0 ? sides.near : sides.far)) continue;
          key_side(side);
          rotate_rows<A>(Q_in, ldq_in, nq, tab.q[side], tab.q_row(si, i0), ilv, D, w.q[side].data());
          q_bad[side] = sides.kind == TileKind::kPartial && w.q_rows[side].scan(w.q[side].data(), D, nq, D);
        }

        // Rows [r0, r1) against key columns [c0, c1) of the block.
        auto block = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, bool masked) {
          const int64_t n = c1 - c0, mr = r1 - r0, sf = s0 + c0;
          const TileSides sub = remap.classify(p0 + r0, p0 + r1 - 1, sf, sf + n - 1);
          const GradRows<A> gr{p0, sf, lse + i0, delta + i0, sp, 0.f, mask, masked};
          A* S_far = w.s_far.data();
          auto split = [&](int64_t r) {  // a row's far columns come before its first near key
            return std::clamp<int64_t>(remap.near_begin(p0 + r) - sf, 0, n);
          };
          // Row groups and, per side, the columns [lo, hi) their rows can take: the whole
          // block for one side, trimmed hulls of kSideRows rows when it holds both.
          std::vector<SideGroup>& groups = w.groups;
          groups.clear();
          if (!sub.both()) {
            const int side = sub.near ? 0 : 1;
            SideGroup g{r0, r1, {0, 0}, {0, 0}};
            g.hi[side] = n;
            groups.push_back(g);
          } else {
            for (int64_t g0 = r0; g0 < r1; g0 += kSideRows) {
              const int64_t g1 = std::min(r1, g0 + kSideRows);
              groups.push_back({g0, g1, {split(g0), 0}, {n, split(g1 - 1)}});
            }
          }
          A* dst[2] = {S, sub.both() ? S_far : S};
          for (const SideGroup& g : groups) {
            for (int side = 0; side < 2; ++side) {
              if (g.hi[side] <= g.lo[side]) continue;
              gemm<A>(g.r1 - g.r0, g.hi[side] - g.lo[side], D, w.q[side].data() + g.r0 * D, D, 1,
                      w.kt[side].data() + c0 + g.lo[side], nk, false,
                      dst[side] + g.r0 * ldS + g.lo[side], ldS);
            }
          }
          if (sub.both()) {
            for (int64_t r = r0; r < r1; ++r) std::copy(S_far + r * ldS, S_far + r * ldS + split(r), S + r * ldS);
          }
          probabilities_rows<A>(S, G, ldS, r0, r1, n, gr);
          // dP = dO V^T; dV += P^T dO.
          gemm<A>(mr, n, D, dO + r0 * lddo, lddo, 1, Vt + c0, nk, false, dP + r0 * ldS, ldS);
          gemm<A>(n, D, mr, S + r0 * ldS, 1, ldS, dO + r0 * lddo, lddo, true, dV + c0 * D, D);
          dscores_rows<A>(S, dP, G, ldS, r0, r1, n, gr);
          // dS by side: the far columns move to S_far (P is no longer needed) and leave zeros.
          A* dS[2] = {dP, sub.both() ? S_far : dP};
          if (sub.both()) {
            for (int64_t r = r0; r < r1; ++r) {
              A* near_row = dP + r * ldS;
              A* far_row = S_far + r * ldS;
              const int64_t c = split(r);
              std::copy(near_row, near_row + c, far_row);
              std::fill(far_row + c, far_row + n, A(0));
              std::fill(near_row, near_row + c, A(0));
            }
          }
          A* dq_rows = dq_base + ooff + i0 * ldo;
          bool sees_bad = false;
          for (const SideGroup& g : groups) {
            for (int side = 0; side < 2; ++side) {
              const int64_t lo = g.lo[side], hi = g.hi[side], gr_rows = g.r1 - g.r0;
              if (hi <= lo) continue;
              // In partial tiles, the clean copies (no non-finite row) meet the masked zeros.
              const bool clean_q = masked && q_bad[side], clean_k = masked && k_bad[side];
              const A* Qm = clean_q ? w.q_rows[side].clean.data() : w.q[side].data();
              const A* Km = clean_k ? w.k_rows[side].clean.data() : w.k[side].data();
              sees_bad = sees_bad || clean_k;
              const A* ds = dS[side] + g.r0 * ldS + lo;
              gemm<A>(hi - lo, D, gr_rows, ds, 1, ldS, Qm + g.r0 * D, D, true,
                      w.dk[side].data() + (c0 + lo) * D, D);
              gemm<A>(gr_rows, D, hi - lo, ds, ldS, 1, Km + (c0 + lo) * D, D, false, w.dq_tile.data(), D);
              rotate_back_rows<A>(w.dq_tile.data(), D, gr_rows, tab.q[side], tab.q_row(si, i0 + g.r0),
                                  ilv, D, dq_rows + g.r0 * ldo, ldo);
            }
          }
          // A row that sees a non-finite key is NaN (the dense formula's 0 * inf), whichever
          // side sees it.
          if (sees_bad) {
            const NonfiniteRows<A>& bad = w.k_rows[k_bad[0] ? 0 : 1];
            for (int64_t r = r0; r < r1; ++r) {
              if (bad.row_sees_bad(mask, p0 + r, s0, c0, c1))
                std::fill(dq_rows + r * ldo, dq_rows + r * ldo + D, A(NAN));
            }
          }
        };
        for_each_row_group(mask, sides.kind, i0, nq, j0, nk, si.k_len, block);
      }
    }

    // dk of the block: each side's rotated-frame sum rotated back; dv as is.
    const int64_t kv_row = p.heads_kv * D;
    const int64_t kv_off = (p.varlen() ? si.k_token0 : it.b * p.seqlen_k) * kv_row + hk * D;
    A* dk_row = w.dk_row.data();
    for (int64_t r = 0; r < nk; ++r) {
      std::fill(dk_row, dk_row + D, A(0));
      for (int side = 0; side < 2; ++side) {
        if (k_ready[side]) {
          rotate_back_rows<A>(w.dk[side].data() + r * D, D, 1, tab.k[side], tab.k_row(si, j0 + r),
                              ilv, D, dk_row, D);
        }
      }
      store_row<T>(dk_row, static_cast<T*>(g.dk) + kv_off + (j0 + r) * kv_row, D);
      store_row<T>(dV + r * D, static_cast<T*>(g.dv) + kv_off + (j0 + r) * kv_row, D);
    }
  }
}

}  // namespace

template <typename T>
void rope_attention_backward(const RopeAttentionParams& rp, const BackwardBuffers& g) {
  using A = acc_t<T>;
  const AttentionParams& p = rp.attn;
  const CpuTiles tiles = backward_tiles(p);
  const RotationTables<A> tab = build_rotation_tables<A>(rp);
  compute_delta<T>(p, g);
  if (g.dsink) compute_dsink<T>(p, g);
  const std::vector<WorkItem> items = key_chunk_items(p, tiles, g.dq_chunks);
  const int64_t kv_elems = g.total_k * p.heads_kv * p.head_dim;
  std::fill(static_cast<T*>(g.dk), static_cast<T*>(g.dk) + kv_elems, T(0));
  std::fill(static_cast<T*>(g.dv), static_cast<T*>(g.dv) + kv_elems, T(0));
  const bool far = rp.remap.has_far();
  parallel_items(
      static_cast<int64_t>(items.size()),
      [&] { return RopeBwdScratch<T>(tiles, p.head_dim, p.score.softcap > 0.0, far); },
      [&](int64_t i, RopeBwdScratch<T>& w) {
        rope_backward_item<T>(rp, tab, g, tiles, g.dq_chunks, items[i], w);
      });
  reduce_dq<T>(p, g);
}

template void rope_attention_backward<float>(const RopeAttentionParams&, const BackwardBuffers&);
template void rope_attention_backward<double>(const RopeAttentionParams&, const BackwardBuffers&);
template void rope_attention_backward<c10::BFloat16>(const RopeAttentionParams&, const BackwardBuffers&);
template void rope_attention_backward<c10::Half>(const RopeAttentionParams&, const BackwardBuffers&);

}  // namespace longattn::cpu
