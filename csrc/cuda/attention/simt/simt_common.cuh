// Building blocks of the SIMT (CUDA-core) attention kernels: the accumulation type's math,
// reductions over a row's thread group, tile loads and stores, the logit transform, a CTA-wide
// GEMM on shared-memory tiles, and the walk of a query tile over its key tiles.
//
// Accumulation type A = acc_t<T> (cuda/device_common.cuh): fp32, fp64 for double inputs. fp32 math
// uses the fast exp/log intrinsics (the build compiles with --use_fast_math anyway); softcap's
// tanh is common/scores.h's, which never uses the approximate tanh instruction.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/attention_params.h"
#include "common/softmax_row.h"
#include "cuda/device_common.cuh"
#include "cuda/attention/simt/simt_tiles.h"

namespace longattn::cuda::simt {

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return static_cast<A>(-INFINITY);
}

__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float acc_log(float x) { return __logf(x); }
__device__ __forceinline__ double acc_log(double x) { return ::log(x); }

// The max that keeps a NaN (common/softmax_row.h's max_nan): running maxima must not drop one.
template <typename A>
__device__ __forceinline__ A amax(A a, A b) {
  return max_nan(a, b);
}

// Lanes [base, base + g) of the warp, g a power of two <= 32, base a multiple of g.
__device__ __forceinline__ unsigned group_lanes(int g) {
  if (g >= 32) return 0xffffffffu;
  const int base = (threadIdx.x & 31) & ~(g - 1);
  return ((1u << g) - 1u) << base;
}

template <typename A>
__device__ __forceinline__ A group_max(A v, int g, unsigned lanes) {
  for (int o = g / 2; o > 0; o >>= 1) v = amax(v, __shfl_xor_sync(lanes, v, o));
  return v;
}

template <typename A>
__device__ __forceinline__ A group_sum(A v, int g, unsigned lanes) {
  for (int o = g / 2; o > 0; o >>= 1) v += __shfl_xor_sync(lanes, v, o);
  return v;
}

// dst[r * ld + d] = src[r * stride + d] for r < rows, d < D, and 0 on the padding up to
// rows_pad x dp (the GEMMs read it; zeros keep garbage, NaN included, out of every sum).
// One warp per row: coalesced along the head dim.
template <typename T, typename A>
__device__ __forceinline__ void load_tile(A* dst, int ld, const T* src, int64_t stride, int rows,
                                          int rows_pad, int D, int dp) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < rows_pad; r += kWarps) {
    A* out = dst + r * ld;
    if (r < rows) {
      const T* in = src + static_cast<int64_t>(r) * stride;
      for (int d = lane; d < dp; d += 32) out[d] = d < D ? to_acc(in[d]) : A(0);
    } else {
      for (int d = lane; d < dp; d += 32) out[d] = A(0);
    }
  }
}

template <typename A>
__device__ __forceinline__ bool is_nonfinite(A x) {
  return !::isfinite(x);
}

template <typename A>
__device__ __forceinline__ bool row_nonfinite(const A* row, int D) {
  for (int d = 0; d < D; ++d) {
    if (is_nonfinite(row[d])) return true;
  }
  return false;
}

// Non-finite rows of a shared-memory tile (rows x D, row stride ld). A partial tile's GEMMs pair
// masked (query, key) entries, whose P or dS is 0, with rows of the other operand, and
// 0 * inf = NaN would reach a row the mask keeps apart from it (docs/semantics.md): such a tile
// zeroes the non-finite rows before the GEMM, and the results that see one are made NaN
// explicitly. tile_has_nonfinite is CTA-wide (every thread calls it; it synchronizes).
template <typename A>
__device__ __forceinline__ bool tile_has_nonfinite(const A* tile, int ld, int rows, int D) {
  int bad = 0;
  for (int i = threadIdx.x; i < rows * D; i += kThreads) bad |= is_nonfinite(tile[(i / D) * ld + i % D]);
  return __syncthreads_or(bad) != 0;
}

// Whether query position pos sees a key of the tile (keys [0, nk) at positions s0 + c) whose
// row in `tile` is not finite.
template <typename A>
__device__ __forceinline__ bool sees_nonfinite_row(const MaskParams& mask, int64_t pos, int64_t s0,
                                                   const A* tile, int ld, int nk, int D) {
  for (int c = 0; c < nk; ++c) {
    if (mask.visible(pos, s0 + c) && row_nonfinite(tile + c * ld, D)) return true;
  }
  return false;
}

// A thread per row: the rare path of a tile that holds a non-finite value.
template <typename A>
__device__ __forceinline__ void zero_nonfinite_rows(A* tile, int ld, int rows, int D) {
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    if (row_nonfinite(tile + r * ld, D)) {
      for (int d = 0; d < D; ++d) tile[r * ld + d] = A(0);
    }
  }
}

template <typename A>
__device__ __forceinline__ void zero_tile(A* dst, int ld, int rows, int dp) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < rows; r += kWarps) {
    for (int d = lane; d < dp; d += 32) dst[r * ld + d] = A(0);
  }
}

// dst[r * stride + d] = src[r * ld + d] for r < rows, d < D, rounded once to T.
template <typename T, typename A>
__device__ __forceinline__ void store_tile(T* dst, int64_t stride, const A* src, int ld, int rows,
                                           int D) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < rows; r += kWarps) {
    T* out = dst + static_cast<int64_t>(r) * stride;
    for (int d = lane; d < D; d += 32) out[d] = from_acc<T>(src[r * ld + d]);
  }
}

// Raw dot product -> logit (docs/semantics.md steps 1-3, the CPU's transform_row): softcap on
// the scaled dot product, then the ALiBi bias. rs = scale * log-n factor of the row. With
// softcap_grad, also d(logit)/d(scaled dot) = 1 - tanh^2 (the CPU's form).
template <typename A>
__device__ __forceinline__ A transform_logit(A raw, A rs, const ScoreParams& sp, A cap, A slope,
                                             int64_t pos, int64_t s, A* softcap_grad) {
  A x;
  if (sp.softcap > 0.0) {
    x = softcap_logit(raw, rs / cap, cap);
    if (softcap_grad != nullptr) *softcap_grad = softcap_derivative(x * (A(1) / cap));
  } else {
    x = raw * rs;
  }
  // |p - s| is exact in fp32 below 2^24; beyond that the bias error is far below its size.
  if (sp.has_alibi) x -= slope * static_cast<A>(pos >= s ? pos - s : s - pos);
  return x;
}

// One 4x4 block of C = A B over k = k0, k0 + kstep, ... < K. The block's rows are
// mi + i * mt and its columns ni + j * nt (interleaved, so neighbouring threads touch
// neighbouring columns: conflict-free shared-memory accesses for unit-stride operands).
template <typename A>
__device__ __forceinline__ void gemm_block(A (&acc)[4][4], int mi, int mt, int ni, int nt, int K,
                                           int k0, int kstep, const A* a, int a_ms, int a_ks,
                                           const A* b, int b_ks, int b_ns) {
  const A* ar[4];
  const A* bc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) ar[i] = a + (mi + i * mt) * a_ms;
#pragma unroll
  for (int j = 0; j < 4; ++j) bc[j] = b + (ni + j * nt) * b_ns;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  }
#pragma unroll 2
  for (int k = k0; k < K; k += kstep) {
    A av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = ar[i][k * a_ks];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = bc[j][k * b_ks];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
  }
}

template <typename A>
__device__ __forceinline__ void gemm_store(const A (&acc)[4][4], int mi, int mt, int ni, int nt,
                                           A* c, int ldc, bool accumulate, const A* row_scale) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = mi + i * mt;
    const A scale = row_scale != nullptr ? row_scale[m] : A(1);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      A* cp = c + m * ldc + ni + j * nt;
      *cp = accumulate ? *cp * scale + acc[i][j] : acc[i][j];
    }
  }
}

// C = A B, or C = diag(row_scale) C + A B with accumulate (row_scale null: 1), on shared
// memory: A(m, k) = a[m * a_ms + k * a_ks], B(k, n) = b[k * b_ks + n * b_ns],
// C(m, n) = c[m * ldc + n]; M and N multiples of 4. Every thread of the CTA must call it
// (small products split K across lanes of a warp and reduce with shuffles). Sums run in a
// fixed order: the result does not depend on scheduling.
template <typename A>
__device__ void cta_gemm(int M, int N, int K, const A* a, int a_ms, int a_ks, const A* b, int b_ks,
                         int b_ns, A* c, int ldc, bool accumulate, const A* row_scale) {
  const int mt = M / 4, nt = N / 4, blocks = mt * nt;
  // Lanes per block: as many as leave every block at most one thread group.
  int ks = 1;
  while (ks < 32 && blocks * ks * 2 <= kThreads) ks *= 2;
  A acc[4][4];
  if (ks == 1) {
    for (int blk = threadIdx.x; blk < blocks; blk += kThreads) {
      const int mi = blk / nt, ni = blk % nt;
      gemm_block(acc, mi, mt, ni, nt, K, 0, 1, a, a_ms, a_ks, b, b_ks, b_ns);
      gemm_store(acc, mi, mt, ni, nt, c, ldc, accumulate, row_scale);
    }
    return;
  }
  // The ks lanes of a block are adjacent and aligned, inside one warp; idle lanes add zeros
  // so the whole warp takes part in the shuffles.
  const int blk = threadIdx.x / ks, part = threadIdx.x % ks;
  const bool active = blk < blocks;
  const int mi = active ? blk / nt : 0, ni = active ? blk % nt : 0;
  gemm_block(acc, mi, mt, ni, nt, active ? K : 0, part, ks, a, a_ms, a_ks, b, b_ks, b_ns);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      for (int o = ks / 2; o > 0; o >>= 1) acc[i][j] += __shfl_xor_sync(0xffffffffu, acc[i][j], o);
    }
  }
  if (active && part == 0) gemm_store(acc, mi, mt, ni, nt, c, ldc, accumulate, row_scale);
}

// The work of a query-major CTA (forward, dQ): a tile of query rows of one q head of one
// sequence. The last query tiles (the costliest under causal masks) get the first blocks.
struct QueryTileWork {
  int64_t b, h, hk;  // sequence, q head, its kv head
  SeqInfo si;
  int64_t i0;        // first row
  int nq;            // rows; 0 when the tile lies past a shorter sequence of a varlen batch
  int64_t p0, p1;    // positions of the first and the last row
};

__device__ __forceinline__ QueryTileWork query_tile_work(const AttentionParams& p, int bq) {
  const int64_t tiles = ceil_div(p.seqlen_q, bq), bh = p.batch * p.heads_q;
  const int64_t id = blockIdx.x;
  QueryTileWork w;
  w.b = (id % bh) / p.heads_q;
  w.h = (id % bh) % p.heads_q;
  w.hk = w.h / p.group();
  w.si = seq_info(p, w.b);
  w.i0 = (tiles - 1 - id / bh) * bq;
  w.nq = w.i0 < w.si.q_len ? static_cast<int>(min64(bq, w.si.q_len - w.i0)) : 0;
  w.p0 = w.si.mask.q_start + w.i0;
  w.p1 = w.p0 + w.nq - 1;
  return w;
}

// body(j0, nk, s0, kind) for every key tile of width <= bk the tile's rows may see: the
// ranges of MaskParams::key_ranges cut into tiles, classified, empty ones skipped. j0 is the
// first key index, s0 its position. CTA-uniform: body may synchronize.
template <typename Body>
__device__ __forceinline__ void for_each_key_tile(const QueryTileWork& w, int bk, Body&& body) {
  const MaskParams& mask = w.si.mask;
  Range ranges[2];
  mask.key_ranges(w.i0, w.i0 + w.nq, w.si.k_len, &ranges[0], &ranges[1]);
  for (const Range& keys : ranges) {
    for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += bk) {
      const int nk = static_cast<int>(min64(bk, keys.hi - j0));
      const int64_t s0 = mask.k_start + j0;
      const TileKind kind = mask.classify(w.p0, w.p1, s0, s0 + nk - 1);
      if (kind != TileKind::kEmpty) body(j0, nk, s0, kind);
    }
  }
}

}  // namespace longattn::cuda::simt
