// CPU forward of rope_attention: attention's forward (cpu/attention_fwd.cpp: items, split-K,
// tile walk of the mask, online softmax) over the union of the remap's visible pairs, with q
// and k rotated as their tiles are loaded (cpu/rotation_tables.h). A tile, or a row group of
// a partial tile, wholly near or wholly far computes one score set; one that holds both
// (common/remap.h: TileSides) computes each side only over the columns its rows can take (a
// row's far columns are those before its first near key), in row groups so that the two
// overlap by at most a group's width.
//
// Rotating a key tile costs a pass over it, as much as packing it transposed, so an item is a
// group of up to 4 query tiles (rope_tiles) that share each rotated key tile: the rotation
// costs a quarter of a pass per (query tile, key tile) pair on top of plain attention's work.
#include <vector>

#include "cpu/forward_rows.h"
#include "cpu/gemm.h"
#include "cpu/rope_attention_kernels.h"
#include "cpu/rotate_rows.h"

namespace longattn::cpu {
namespace {

// item.q rows per work item, in sub-tiles of sub_q rows (attention's query tile).
struct RopeTiles {
  CpuTiles item;
  int64_t sub_q;
};

// Items of 4 (else 2) query tiles while at least this many remain: fixed, not the thread
// count, so the tiles (and the bits) do not depend on the machine's threads.
constexpr int64_t kMinGroupedItems = 64;
// Rows per block of a tile holding both sides: each side's columns are trimmed to the hull
// of the block's rows, which overlap by the block's height.
constexpr int64_t kSideRows = 32;

RopeTiles rope_tiles(const AttentionParams& p) {
  const CpuTiles t = choose_tiles(p);
  RopeTiles r{t, t.q};
  for (int64_t group : {4, 2}) {
    if (p.batch * p.heads_q * ceil_div(p.seqlen_q, group * t.q) >= kMinGroupedItems) {
      r.item.q = group * t.q;
      break;
    }
  }
  return r;
}

template <typename T>
struct RopeFwdScratch {
  using A = acc_t<T>;
  std::vector<A> s, s_far, o, q_in, k_in, k_rot, v, m, l;
  std::vector<A> q[2], kt[2];  // rotated Q (the item's rows), and K^T, per side
  NonfiniteRows<A> nonfinite;  // the V tile's, in partial tiles
  RopeFwdScratch(const RopeTiles& t, int64_t D, bool far)
      : s(t.sub_q * t.item.k), s_far(far ? t.sub_q * t.item.k : 0), o(t.item.q * D),
        q_in(t.item.q * D), k_in(t.item.k * D), k_rot(t.item.k * D), v(t.item.k * D),
        m(t.item.q), l(t.item.q) {
    for (int side = 0; side < (far ? 2 : 1); ++side) {
      q[side].resize(t.item.q * D);
      kt[side].resize(t.item.k * D);
    }
  }
};

// As attention's forward_keys (cpu/attention_fwd.cpp), key tiles [tile_begin, tile_end) of
// one item, whole (part_out null) or a split chunk.
template <typename T>
void rope_forward_keys(const RopeAttentionParams& rp, const RotationTables<acc_t<T>>& tab,
                       const RopeTiles& tiles, const WorkItem& it, int64_t tile_begin,
                       int64_t tile_end, RopeFwdScratch<T>& w, acc_t<T>* part_out,
                       acc_t<T>* part_lse) {
  using A = acc_t<T>;
  const AttentionParams& p = rp.attn;
  const int64_t D = p.head_dim, tk = tiles.item.k, tq = tiles.sub_q;
  const SeqInfo si = seq_info(p, it.b);
  const MaskParams& mask = si.mask;  // the union of near and far
  const RemapMask remap = rp.remap_mask(si);
  const bool ilv = rp.rot.interleaved;
  const int64_t h = it.h, hk = h / p.group();
  const int64_t i0 = it.tile * tiles.item.q, nq = std::min(tiles.item.q, si.q_len - i0);
  const int64_t ldS = tk;

  const T* qp = static_cast<const T*>(p.q) + q_offset(p, si, it.b, h) + i0 * p.q_row_stride;
  const T* kp = static_cast<const T*>(p.k) + k_offset(p, si, it.b, hk);
  const T* vp = static_cast<const T*>(p.v) + v_offset(p, si, it.b, hk);
  int64_t ldq_in;
  const A* Q_in = load_rows<T>(qp, p.q_row_stride, nq, D, w.q_in.data(), &ldq_in);
  bool q_rotated[2] = {false, false};
  auto Q = [&](int side) {  // the item's query rows on one side, rotated on first use
    if (!q_rotated[side]) {
      rotate_rows<A>(Q_in, ldq_in, nq, tab.q[side], tab.q_row(si, i0), ilv, D, w.q[side].data());
      q_rotated[side] = true;
    }
    return w.q[side].data();
  };

  A* S = w.s.data();
  A* S_far = w.s_far.data();
  const RunningRows<A> run{w.o.data(), w.m.data(), w.l.data(), D};
  std::fill(run.O, run.O + nq * D, A(0));
  std::fill(run.m, run.m + nq, neg_inf<A>());
  std::fill(run.l, run.l + nq, A(0));

  const ScoreParams& sp = p.score;
  const int64_t p0 = mask.q_start + i0, p1 = p0 + nq - 1;

  Range ranges[2];
  mask.key_ranges(i0, i0 + nq, si.k_len, &ranges[0], &ranges[1]);
  int64_t tile_index = 0;
  for (const Range& keys : ranges) {
    for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += tk, ++tile_index) {
      if (tile_index < tile_begin || tile_index >= tile_end) continue;
      const int64_t nk = std::min(tk, keys.hi - j0);
      const int64_t s0 = mask.k_start + j0;
      const TileSides sides = remap.classify(p0, p1, s0, s0 + nk - 1);
      if (sides.kind == TileKind::kEmpty) continue;

      int64_t ldk, ldv;
      const A* K = load_rows<T>(kp + j0 * p.k_row_stride, p.k_row_stride, nk, D, w.k_in.data(), &ldk);
      for (int side = 0; side < 2; ++side) {
        if (!(side == 0 ? sides.near : sides.far)) continue;
        rotate_rows<A>(K, ldk, nk, tab.k[side], tab.k_row(si, j0), ilv, D, w.k_rot.data());
        transpose<A>(w.k_rot.data(), D, nk, D, w.kt[side].data(), nk);
      }
      const A* V = load_rows<T>(vp + j0 * p.v_row_stride, p.v_row_stride, nk, D, w.v.data(), &ldv);
      // A partial tile's P V product pairs masked (query, key) entries, P = 0, with V rows:
      // a non-finite one there would reach rows that cannot see the key (tile.h, NonfiniteRows).
      const bool v_bad = sides.kind == TileKind::kPartial && w.nonfinite.scan(V, ldv, nk, D);
      if (v_bad) {
        V = w.nonfinite.clean.data();
        ldv = D;
      }

      for (int64_t u0 = 0; u0 < nq; u0 += tq) {  // the item's query tiles share K and V
        const int64_t nu = std::min(tq, nq - u0), pu = p0 + u0;
        const TileSides sides_u = remap.classify(pu, pu + nu - 1, s0, s0 + nk - 1);
        if (sides_u.kind == TileKind::kEmpty) continue;
        const RunningRows<A> run_u{run.O + u0 * D, run.m + u0, run.l + u0, D};
        // S[r][c0 + [lo, hi)) = <Q rows of the side, K^T columns of the side>.
        auto side_scores = [&](int side, A* dst, int64_t r0, int64_t r1, int64_t c0, int64_t lo,
                               int64_t hi) {
          if (hi <= lo) return;
          gemm<A>(r1 - r0, hi - lo, D, Q(side) + (u0 + r0) * D, D, 1, w.kt[side].data() + c0 + lo,
                  nk, false, dst + r0 * ldS + lo, ldS);
        };
        auto block = [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, bool masked) {
          const int64_t n = c1 - c0, sf = s0 + c0;
          const TileSides sub = remap.classify(pu + r0, pu + r1 - 1, sf, sf + n - 1);
          if (!sub.both()) {
            side_scores(sub.near ? 0 : 1, S, r0, r1, c0, 0, n);
          } else {
            auto split = [&](int64_t r) {
              return std::clamp<int64_t>(remap.near_begin(pu + r) - sf, 0, n);
            };
            for (int64_t g0 = r0; g0 < r1; g0 += kSideRows) {
              const int64_t g1 = std::min(r1, g0 + kSideRows);
              side_scores(0, S, g0, g1, c0, split(g0), n);
              side_scores(1, S_far, g0, g1, c0, 0, split(g1 - 1));
              for (int64_t r = g0; r < g1; ++r) {
                std::copy(S_far + r * ldS, S_far + r * ldS + split(r), S + r * ldS);
              }
            }
          }
          online_softmax_rows<A>(S, ldS, r0, r1, n, pu, sf, sp, 0.f, mask, masked,
                                 v_bad ? &w.nonfinite : nullptr, s0, c0, c1, run_u);
          gemm<A>(r1 - r0, D, n, S + r0 * ldS, ldS, 1, V + c0 * ldv, ldv, true,
                  run_u.O + r0 * D, D);
        };
        for_each_row_group(mask, sides_u.kind, i0 + u0, nu, j0, nk, si.k_len, block);
      }
    }
  }

  if (part_out != nullptr) {
    finish_chunk_rows<A>(nq, run, part_out, part_lse);
    return;
  }
  finish_item_rows<T>(p, si, it.b, h, i0, nq, run);
}

}  // namespace

template <typename T>
void rope_attention_forward(const RopeAttentionParams& rp) {
  using A = acc_t<T>;
  const AttentionParams& p = rp.attn;
  const RopeTiles tiles = rope_tiles(p);
  const RotationTables<A> tab = build_rotation_tables<A>(rp);
  const bool far = rp.remap.has_far();
  run_forward<T>(
      p, tiles.item, [&] { return RopeFwdScratch<T>(tiles, p.head_dim, far); },
      [&](const WorkItem& it, int64_t tile_begin, int64_t tile_end, RopeFwdScratch<T>& w,
          A* part_out, A* part_lse) {
        rope_forward_keys<T>(rp, tab, tiles, it, tile_begin, tile_end, w, part_out, part_lse);
      });
}

template void rope_attention_forward<float>(const RopeAttentionParams&);
template void rope_attention_forward<double>(const RopeAttentionParams&);
template void rope_attention_forward<c10::BFloat16>(const RopeAttentionParams&);
template void rope_attention_forward<c10::Half>(const RopeAttentionParams&);

}  // namespace longattn::cpu
