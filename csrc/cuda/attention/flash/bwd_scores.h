// The element-wise part of the backward, on one (query tile, key tile) pair in registers:
// recompute P from the raw scores and the saved lse, then dS = P (dP - delta), chained
// through softcap and the log-n row factor. Same order of operations as the CPU backward
// (csrc/cpu/attention_bwd.cpp) and docs/semantics.md; the logit rules come from
// common/scores.h and the mask from common/mask.h.
#pragma once
#include <cmath>
#include <cstring>

#include "common/attention_params.h"
#include "cuda/attention/flash/bwd_params.h"
#include "cuda/attention/flash/bwd_utils.h"

namespace longattn::cuda::flash {

// d softcap / d x = 1 - tanh^2 in [0, 1], kept per element between P and dS: fp16 halves its
// registers; its 2^-11 rounding is below that of dS, which goes to the GEMMs in fp16/bf16.
using SoftcapGrad = cutlass::half_t;

// One (query tile, key tile) pair inside a sequence.
struct TileGeom {
  int64_t i0 = 0, j0 = 0;  // first query row / first key of the tile, in the sequence
  int nq = 0, nk = 0;      // rows / keys inside the sequence (<= the block sizes)
  bool masked = false;     // per-element visibility needed: a partial tile, or keys past the end
  bool padded = false;     // rows past the end (zero-filled; their P and dS must be exact zeros)
  bool empty = false;      // no visible pair: skipped
};

// The tile of kBlockM query rows from i0 and kBlockN keys from j0 of sequence si.
template <int kBlockM, int kBlockN>
BWD_DEVICE TileGeom tile_geom(const SeqInfo& si, int64_t i0, int64_t j0) {
  TileGeom t;
  t.i0 = i0;
  t.j0 = j0;
  t.nq = static_cast<int>(min64(kBlockM, si.q_len - i0));
  t.nk = static_cast<int>(min64(kBlockN, si.k_len - j0));
  const int64_t p0 = si.mask.q_start + i0, s0 = si.mask.k_start + j0;
  const TileKind kind = si.mask.classify(p0, p0 + t.nq - 1, s0, s0 + t.nk - 1);
  // Keys past the end need the mask (zero-filled K gives finite scores whose exp could
  // overflow). Rows past the end (lse +inf, see load_tile_rows) get P = 0 from the exponent
  // while their scores are finite; a non-finite K or V makes their S or dP NaN, which the dK / dV
  // sums over rows must not see, so they are zeroed by row (see probs_from_scores).
  t.masked = kind != TileKind::kFull || t.nk < kBlockN;
  t.padded = t.nq < kBlockM;
  t.empty = kind == TileKind::kEmpty;
  return t;
}

// (row, col) of each element of this thread's (M x N) accumulator of tiled_mma, in the rowcol
// view of acc_rowcol.
template <class TiledMma, int M, int N>
BWD_DEVICE auto acc_coords(int tid) {
  Tensor c = TiledMma{}.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
  return make_tensor(c.data(), acc_rowcol(c.layout()));
}

// Per-row values of the rows this thread holds in an accumulator tile.
template <int kRows>
struct TileRows {
  float lse2[kRows];   // lse * log2(e); +inf for rows without gradient (past the end, no key)
  float delta[kRows];  // rowsum(dO * O) - dlse; 0 for rows without gradient
  float fac[kRows];    // log-n factor of the row's position (1 without log-n)
};

// rows_rc: the rowcol view of the thread's accumulator coordinates (acc_rowcol of an
// identity tensor's partition). lse and delta point at row i0 of the head.
template <int kRows, class RowCoords>
BWD_DEVICE void load_tile_rows(TileRows<kRows>& r, RowCoords const& rows_rc, const float* lse,
                               const float* delta, const SeqInfo& si, const TileGeom& t,
                               double inv_log_logn_base) {
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    const int row = get<0>(rows_rc(mi, 0));
    float l = -INFINITY, d = 0.f;
    if (row < t.nq) {
      l = lse[row];
      d = delta[row];
    }
    // A row with lse = -inf sees no key: P = 0 everywhere. +inf in the exponent gives exactly
    // that (exp2(x - inf) = 0) without a NaN from (-inf) - (-inf).
    const bool live = l != -INFINITY;
    r.lse2[mi] = live ? l * kLog2e : INFINITY;
    r.delta[mi] = live ? d : 0.f;
    r.fac[mi] = static_cast<float>(logn_factor(si.mask.q_start + t.i0 + row, inv_log_logn_base));
  }
}

// s: raw q.k scores (rowcol view) -> P in place. With kSoftcap, gcap (SoftcapGrad) receives
// d softcap / d x = 1 - tanh^2 per element. Masked and out-of-range elements get P = -0 by
// selection: never NaN, whatever their score (a non-finite q or k, a NaN lse), and marked for
// grad_scores by the sign of the zero (exp2 never gives -0).
template <bool kSoftcap, int kRows, class S, class G, class Coords>
BWD_DEVICE void probs_from_scores(S& s, G& gcap, Coords const& c, const TileRows<kRows>& r,
                                  const BwdParams& bp, const SeqInfo& si, const TileGeom& t,
                                  float slope) {
  constexpr int kCols = decltype(size<1>(s))::value;
  const bool has_alibi = bp.p.score.has_alibi;
  if (!kSoftcap && !has_alibi) {
    // logit * log2(e) = q.k * (scale * fac * log2(e)): one FMA and one exp2 per element.
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      const float k2 = bp.scale * r.fac[mi] * kLog2e;
#pragma unroll
      for (int ni = 0; ni < kCols; ++ni) s(mi, ni) = exp2f(fmaf(s(mi, ni), k2, -r.lse2[mi]));
    }
  } else {
    // p - s of the tile's first row and key: ALiBi needs |p - s| per element.
    const int64_t d0 = (si.mask.q_start + t.i0) - (si.mask.k_start + t.j0);
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      const float rs = bp.scale * r.fac[mi];
      const int row = get<0>(c(mi, 0));
#pragma unroll
      for (int ni = 0; ni < kCols; ++ni) {
        float x = s(mi, ni) * rs;
        if constexpr (kSoftcap) {
          const float th = softcap_tanh(x * bp.inv_softcap);
          x = bp.softcap * th;
          gcap(mi, ni) = static_cast<SoftcapGrad>(softcap_derivative(th));
        }
        if (has_alibi) x += alibi_bias(slope, d0 + row, get<1>(c(0, ni)));
        s(mi, ni) = exp2f(fmaf(x, kLog2e, -r.lse2[mi]));
      }
    }
  }
  if (t.masked) {
    const int64_t p0 = si.mask.q_start + t.i0, s0 = si.mask.k_start + t.j0;
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = get<0>(c(mi, 0));
      const int64_t pos = p0 + row;
#pragma unroll
      for (int ni = 0; ni < kCols; ++ni) {
        const int col = get<1>(c(0, ni));
        if (row >= t.nq || col >= t.nk || !si.mask.visible(pos, s0 + col)) s(mi, ni) = -0.f;
      }
    }
  } else if (t.padded) {
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
      if (get<0>(c(mi, 0)) >= t.nq) {
#pragma unroll
        for (int ni = 0; ni < kCols; ++ni) s(mi, ni) = -0.f;
      }
    }
  }
}

// Whether x is -0, the mark of a masked P (see probs_from_scores); a NaN P may carry the sign
// bit too (the host's default NaN does), so the test is on all bits.
BWD_DEVICE bool is_neg_zero(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x) == 0x80000000u;
#else
  uint32_t i;
  std::memcpy(&i, &x, sizeof(i));
  return i == 0x80000000u;
#endif
}

// dp: dO V^T (rowcol view) -> the gradient of the raw q.k scores without the softmax scale
// (applied once to dQ and dK at the end): P (dP - delta) [* (1 - tanh^2)] * fac. With
// `select` (a masked or padded tile), entries whose P is the masked -0 get dS = 0 exactly: the
// product would be NaN where dP is not finite (a non-finite V row) or delta is NaN (a NaN
// output row), and masked pairs must contribute nothing.
template <bool kSoftcap, int kRows, class DP, class S, class G>
BWD_DEVICE void grad_scores(DP& dp, S const& s, G const& gcap, const TileRows<kRows>& r, bool select) {
  constexpr int kCols = decltype(size<1>(s))::value;
  const auto ds = [&](int mi, int ni) {
    float v = s(mi, ni) * (dp(mi, ni) - r.delta[mi]);
    if constexpr (kSoftcap) v *= static_cast<float>(gcap(mi, ni));
    return v * r.fac[mi];
  };
  if (select) {
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kCols; ++ni) dp(mi, ni) = is_neg_zero(s(mi, ni)) ? 0.f : ds(mi, ni);
    }
  } else {
#pragma unroll
    for (int mi = 0; mi < kRows; ++mi) {
#pragma unroll
      for (int ni = 0; ni < kCols; ++ni) dp(mi, ni) = ds(mi, ni);
    }
  }
}

// S = Q K^T into acc_s, then P in place (probs_from_scores).
template <bool kSoftcap, int kRows, class Gemm, class AccS, class G, class SQ, class SK, class Coords>
BWD_DEVICE void tile_probs(Gemm const& gemm, AccS& acc_s, G& gcap, SQ const& sQ, SK const& sK, Coords const& c,
                           const TileRows<kRows>& r, const BwdParams& bp, const SeqInfo& si, const TileGeom& t,
                           float slope) {
  clear(acc_s);
  gemm.run(acc_s, sQ, sK);
  Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
  probs_from_scores<kSoftcap>(s, gcap, c, r, bp, si, t, slope);
}

// dP = dO V^T into acc_dp, then dS in place (grad_scores) from P in acc_s.
template <bool kSoftcap, int kRows, class Gemm, class AccDP, class AccS, class G, class SdO, class SV>
BWD_DEVICE void tile_dscores(Gemm const& gemm, AccDP& acc_dp, AccS const& acc_s, G const& gcap, SdO const& sdO,
                             SV const& sV, const TileRows<kRows>& r, const TileGeom& t) {
  clear(acc_dp);
  gemm.run(acc_dp, sdO, sV);
  Tensor ds = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
  grad_scores<kSoftcap>(ds, make_tensor(acc_s.data(), acc_rowcol(acc_s.layout())), gcap, r, t.masked || t.padded);
}

}  // namespace longattn::cuda::flash
