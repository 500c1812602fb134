// The bandwidth decode kernel: split-K over the cache (flash-decoding) for bf16/fp16/fp32 caches
// whose key rows are kLanes = 8, 16 or 32 aligned 16-byte vectors (bf16 head dims 64/128/256,
// fp32 32/64/128) with D == Dv, contiguous or paged (common/kv_slots.h).
//
// Decode reads every cached byte once and does ~G*n FMAs per element, so it is bound by HBM
// bandwidth as long as (1) enough bytes are in flight per SM, (2) the loads are whole sectors,
// and (3) the instructions per byte stay well below the SM's issue rate. Hence:
//
// - A CTA per (split of the head's keys, kv head (x row block), batch); the split count comes
//   from the SM count (decode_launch.cu), so one sequence fills the GPU (DecodeSplit).
// - Its span streams through shared memory in tiles of kKeys keys (16 KiB of K, 16 KiB of V),
//   two stages of cp.async: the next tile travels while this one is used, in no registers.
//   Thread (f, g) copies vector f of keys g, g + kGroups, ...: each key row is kLanes
//   consecutive 16-byte accesses, a warp reads 512 contiguous bytes.
// - Logits: the same thread takes the dot products of its vector with the rows' query slices
//   (fp32 in shared memory, kRowBlock rows at a time), for its kKeysPerThread keys; a
//   reduce-scatter across the key's kLanes threads (a fixed butterfly) leaves each thread a
//   finished logit or two, written to shared memory once.
// - Online softmax, one warp per row over the tile; masked keys get p = -0.0, which P.V skips
//   (0 * v would carry a non-finite v to rows that do not see it, docs/semantics.md).
// - P.V: thread (vector f, key part kp, row set rs) accumulates up to kAccFloats values in fp32
//   registers over the keys kp, kp + KP, ... of each tile, rescaled per tile by the row's
//   alpha; the key parts are summed in part order at the end of the span (deterministic).
// - The span's partial (out / l, m + log l) per row goes to the scratch the combine merges in
//   split order (decode_combine_kernel.cu, common/merge.h's weights); with scores the logits go
//   to a slot-indexed buffer the scores pass reads. No atomics anywhere.
//
// Per tile of 32 KiB (bf16, D 128, a GQA group of 4): ~130 FMA and ~450 instructions per thread,
// 2 CTAs of 256 threads per SM: ~60% of an H100/H200 SM's issue rate at full HBM bandwidth, and
// 32-64 KiB in flight per SM where ~25 KiB covers the latency. Larger groups (n new tokens x G)
// cost proportionally more FMAs: past ~16 rows the kernel is compute-bound on CUDA cores.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/kv_slots.h"
#include "common/kvcache_math.h"
#include "cuda/kvcache/decode_kernels.h"
#include "cuda/kvcache/kv_device.cuh"

namespace longattn::cuda {
namespace {

using namespace kv_device;

constexpr int kThreads = 256;
constexpr int kKeysPerThread = 4;  // keys per thread per tile
constexpr int kRowBlock = 2;       // query rows per logits pass
constexpr int kAccFloats = 32;     // P.V accumulators per thread

template <typename T, int kLanes>
struct Tile {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  static constexpr int kD = kLanes * kVec;                       // head dim
  static constexpr int kGroups = kThreads / kLanes;              // key rows per pass of the CTA
  static constexpr int kKeys = kGroups * kKeysPerThread;         // keys per tile
  static constexpr int kRowsPerThread = kAccFloats / kVec;       // P.V rows per thread
  static constexpr int64_t kTileBytes = int64_t{kKeys} * kD * sizeof(T);  // 16 KiB
  // Rows one CTA can serve: every P.V row set needs a key group.
  static constexpr int kMaxRows = kGroups * kRowsPerThread;
};

// Byte offsets of the dynamic shared memory for `rows` query rows.
template <typename T, int kLanes>
struct TileSmem {
  int64_t kpos = 0, qpos = 0, q = 0, s = 0, m = 0, l = 0, alpha = 0, total = 0;
  __host__ __device__ explicit TileSmem(int64_t rows) {
    using S = Tile<T, kLanes>;
    int64_t o = 4 * S::kTileBytes;  // two stages of (K tile, V tile)
    kpos = o;  // per stage: the tile's key positions
    o += 2 * S::kKeys * 8;
    qpos = o;
    o += (rows * 8 + 15) / 16 * 16;
    q = o;  // fp32 query rows
    o += rows * S::kD * 4;
    s = o;  // logits, then probabilities, of the tile
    o += rows * S::kKeys * 4;
    m = o;
    o += rows * 4;
    l = o;
    o += rows * 4;
    alpha = o;
    o += rows * 4;
    total = o;
  }
};

// Sums v over the kLanes threads of each aligned lane group with a butterfly that halves the
// values each step (a fixed order: the same result on every run). Afterwards lane f of a group
// holds, in v[0 .. M / kLanes), the sums of values [f * M / kLanes, ...) when M >= kLanes; else
// v[0] is the sum of value f / (kLanes / M), held by kLanes / M lanes.
template <int O, int Cnt, int M, typename A>
__device__ __forceinline__ void reduce_scatter_step(A (&v)[M], int lane) {
  if constexpr (O >= 1) {
    if constexpr (Cnt > 1) {
      constexpr int H = Cnt / 2;
      const bool upper = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const A send = upper ? v[i] : v[i + H];
        const A keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
      }
      reduce_scatter_step<O / 2, H>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
      reduce_scatter_step<O / 2, 1>(v, lane);
    }
  }
}

template <int kLanes, int M, typename A>
__device__ __forceinline__ void reduce_scatter(A (&v)[M], int lane) {
  reduce_scatter_step<kLanes / 2, M>(v, lane);
}

template <typename T, int kLanes>
__global__ void __launch_bounds__(kThreads, 2) decode_tile_kernel(const DecodeParams p,
                                                                  const TilePlan tp) {
  using S = Tile<T, kLanes>;
  constexpr int kVec = S::kVec, kD = S::kD, kGroups = S::kGroups, kKeys = S::kKeys;
  constexpr float kNegInf = -INFINITY;

  const int64_t split = blockIdx.x, b = blockIdx.z;
  const int64_t h = blockIdx.y / tp.row_blocks, rb = blockIdx.y % tp.row_blocks;
  const int64_t L = length_at(p.lengths, b, h);
  if (L < 0 || L > p.C) return;  // the combine writes the head's NaN rows
  const int64_t span = tp.split.span(L), j_begin = split * span;
  if (j_begin >= L) return;  // past count(L): the combine reads no partial of this split
  const int64_t j_end = L - j_begin < span ? L : j_begin + span;
  const int64_t R = p.G * p.n, r0 = rb * tp.rows_per_cta;
  const int rows = static_cast<int>(R - r0 < tp.rows_per_cta ? R - r0 : tp.rows_per_cta);
  const int64_t bh = b * p.Hkv + h;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int f = tid % kLanes, g = tid / kLanes;  // vector f of key group g

  const TileSmem<T, kLanes> lay(rows);
  unsigned char* smem = dynamic_smem<unsigned char>();
  T* stages = reinterpret_cast<T*>(smem);  // stage t: K tile at t * 2 * kKeys * kD, then V
  int64_t* kpos_s = reinterpret_cast<int64_t*>(smem + lay.kpos);
  int64_t* qpos_s = reinterpret_cast<int64_t*>(smem + lay.qpos);
  float* q_s = reinterpret_cast<float*>(smem + lay.q);
  float* s_s = reinterpret_cast<float*>(smem + lay.s);
  float* m_s = reinterpret_cast<float*>(smem + lay.m);
  float* l_s = reinterpret_cast<float*>(smem + lay.l);
  float* alpha_s = reinterpret_cast<float*>(smem + lay.alpha);

  const bool has_qpos = p.q_positions != nullptr, has_kpos = has_qpos && p.positions != nullptr;
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);

  {  // The rows' queries (fp32), their positions and running softmax state.
    const T* q = static_cast<const T*>(p.q) + (bh * R + r0) * kD;
    for (int e = tid; e < rows * kD; e += kThreads) q_s[e] = to_acc(q[e]);
    for (int r = tid; r < rows; r += kThreads) {
      qpos_s[r] = has_qpos ? p.q_positions[b * p.qps[0] + ((r0 + r) % p.n) * p.qps[1]] : 0;
      m_s[r] = kNegInf;
      l_s[r] = 0.f;
    }
  }

  // A key whose block the table does not name (paged; bad input) turns the span's rows NaN.
  bool bad_block = false;
  auto issue = [&](int64_t j0, int stage) {
    T* kt = stages + stage * 2 * kKeys * kD;
    T* vt = kt + kKeys * kD;
#pragma unroll
    for (int k = 0; k < kKeysPerThread; ++k) {
      const int jj = g + kGroups * k;
      const int64_t j = j0 + jj;
      const kv::Slot sl = j < j_end ? p.slots.locate(b, h, j) : kv::Slot{-1, 0};
      bad_block |= j < j_end && !sl.valid();
      const bool ok = sl.valid();
      cp_async<16>(kt + jj * kD + f * kVec, ok ? kbase + p.ks.offset(sl, h) + f * kVec : kbase, ok);
      cp_async<16>(vt + jj * kD + f * kVec, ok ? vbase + p.vs.offset(sl, h) + f * kVec : vbase, ok);
    }
    if (has_kpos && tid < kKeys) {
      const int64_t j = j0 + tid;
      const kv::Slot sl = j < j_end ? p.slots.locate(b, h, j) : kv::Slot{-1, 0};
      cp_async<8>(kpos_s + stage * kKeys + tid,
                  sl.valid() ? p.positions + p.ps.offset(sl, h) : p.positions, sl.valid());
    }
    cp_async_commit();
  };

  // P.V ownership: rs_count row sets (a power of two) of up to kRowsPerThread rows; the key
  // groups of a row set split its keys (kp_count parts).
  int rs_count = 1;
  while (rs_count * S::kRowsPerThread < rows) rs_count *= 2;
  const int kp_count = kGroups / rs_count;
  const int kp = g % kp_count, rs = g / kp_count;
  float acc[S::kRowsPerThread][kVec];
#pragma unroll
  for (int i = 0; i < S::kRowsPerThread; ++i) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[i][e] = 0.f;
  }

  const float scale = static_cast<float>(p.scale);
  float* logits = p.logits ? static_cast<float*>(p.logits) + (bh * R + r0) * p.C : nullptr;
  const int64_t ntiles = (j_end - j_begin + kKeys - 1) / kKeys;
  issue(j_begin, 0);
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t j0 = j_begin + t * kKeys;
    const int nj = static_cast<int>(j_end - j0 < kKeys ? j_end - j0 : kKeys);
    const int stage = static_cast<int>(t & 1);
    cp_async_wait<0>();
    // Tile t is in place for everyone, and everyone is done with tile t - 1: its stage is free.
    __syncthreads();
    if (t + 1 < ntiles) issue(j0 + kKeys, stage ^ 1);
    const T* kt = stages + stage * 2 * kKeys * kD;
    const T* vt = kt + kKeys * kD;
    const int64_t* kpos_t = kpos_s + stage * kKeys;

    // ---- logits ----
    float kf[kKeysPerThread][kVec];
#pragma unroll
    for (int k = 0; k < kKeysPerThread; ++k) {
      Elems<T, kVec, true> e;
      e.load(kt + (g + kGroups * k) * kD + f * kVec);
#pragma unroll
      for (int x = 0; x < kVec; ++x) kf[k][x] = to_acc(e.v[x]);
    }
    for (int rb0 = 0; rb0 < rows; rb0 += kRowBlock) {
      constexpr int M = kRowBlock * kKeysPerThread;
      float part[M];
#pragma unroll
      for (int r = 0; r < kRowBlock; ++r) {
        float qv[kVec];
        if (rb0 + r < rows) {
          const float4* qr = reinterpret_cast<const float4*>(q_s + (rb0 + r) * kD + f * kVec);
#pragma unroll
          for (int x = 0; x < kVec / 4; ++x) {
            const float4 w = qr[x];
            qv[4 * x] = w.x;
            qv[4 * x + 1] = w.y;
            qv[4 * x + 2] = w.z;
            qv[4 * x + 3] = w.w;
          }
        } else {
#pragma unroll
          for (int x = 0; x < kVec; ++x) qv[x] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < kKeysPerThread; ++k) {
          float d = 0.f;
#pragma unroll
          for (int x = 0; x < kVec; ++x) d += qv[x] * kf[k][x];
          part[r * kKeysPerThread + k] = d;
        }
      }
      reduce_scatter<kLanes>(part, lane);
      constexpr int kHeld = M >= kLanes ? M / kLanes : 1;
      constexpr int kShare = M >= kLanes ? 1 : kLanes / M;
      if (f % kShare == 0) {
#pragma unroll
        for (int i = 0; i < kHeld; ++i) {
          const int v = M >= kLanes ? f * kHeld + i : f / kShare;
          const int row = rb0 + v / kKeysPerThread, jj = g + kGroups * (v % kKeysPerThread);
          if (row < rows && jj < nj) {
            const int64_t j = j0 + jj;
            const bool vis = !has_qpos || kv::decode_visible(j, has_kpos ? kpos_t[jj] : j, true,
                                                             qpos_s[row], p.window, p.sinks);
            const float s = vis ? part[i] * scale : kNegInf;
            s_s[row * kKeys + jj] = s;
            if (logits) logits[row * p.C + j] = s;
          }
        }
      }
    }
    __syncthreads();

    // ---- online softmax, a warp per row ----
    bool masked_seen = false;
    for (int row = warp; row < rows; row += kThreads / 32) {
      float* sr = s_s + row * kKeys;
      float mt = kNegInf;
      for (int jj = lane; jj < nj; jj += 32) mt = max_nan(mt, sr[jj]);
      mt = warp_max(mt);
      const float m_old = m_s[row];
      const float m_new = max_nan(m_old, mt);
      // exp(-inf - -inf) would be NaN: a row with no finite logit yet keeps alpha 1.
      const float alpha = m_new == kNegInf ? 1.f : acc_exp(m_old - m_new);
      float sum = 0.f;
      for (int jj = lane; jj < nj; jj += 32) {
        const bool masked = sr[jj] == kNegInf;
        masked_seen |= masked;
        const float e = masked ? -0.f : acc_exp(sr[jj] - m_new);
        sr[jj] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        m_s[row] = m_new;
        l_s[row] = l_s[row] * alpha + sum;
        alpha_s[row] = alpha;
      }
    }
    const bool tile_masked = __syncthreads_or(masked_seen) != 0;

    // ---- P.V ----
#pragma unroll
    for (int i = 0; i < S::kRowsPerThread; ++i) {
      const int row = rs + rs_count * i;
      if (row < rows) {
        const float a = alpha_s[row];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[i][e] *= a;
      }
    }
    for (int jj = kp; jj < nj; jj += kp_count) {
      Elems<T, kVec, true> ve;
      ve.load(vt + jj * kD + f * kVec);
      float vf[kVec];
#pragma unroll
      for (int x = 0; x < kVec; ++x) vf[x] = to_acc(ve.v[x]);
#pragma unroll
      for (int i = 0; i < S::kRowsPerThread; ++i) {
        const int row = rs + rs_count * i;
        if (row >= rows) continue;
        const float pr = s_s[row * kKeys + jj];
        if (tile_masked && ::signbit(pr)) continue;  // masked: nothing, not 0 * v
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[i][e] += pr * vf[e];
      }
    }
  }

  // ---- the span's partial: key parts summed in order, normalized ----
  // Also the barrier after the last P.V: the stages are free for the sums.
  const bool bad = __syncthreads_or(bad_block) != 0;
  float* red = reinterpret_cast<float*>(smem);  // [kp_count][rows][kD] (<= 32 KiB)
#pragma unroll
  for (int i = 0; i < S::kRowsPerThread; ++i) {
    const int row = rs + rs_count * i;
    if (row >= rows) continue;
#pragma unroll
    for (int e = 0; e < kVec; ++e) red[(kp * rows + row) * kD + f * kVec + e] = acc[i][e];
  }
  __syncthreads();
  const int64_t nsplit = tp.split.max_splits;
  float* part_out = static_cast<float*>(p.part_out) + ((bh * nsplit + split) * R + r0) * kD;
  float* part_lse = static_cast<float*>(p.part_lse) + (bh * nsplit + split) * R + r0;
  for (int x = tid; x < rows * kD; x += kThreads) {
    const int row = x / kD, d = x % kD;
    float sum = 0.f;
    for (int k = 0; k < kp_count; ++k) sum += red[(k * rows + row) * kD + d];
    const float m = m_s[row];
    part_out[x] = bad ? NAN : m == kNegInf ? 0.f : sum / l_s[row];
  }
  for (int row = tid; row < rows; row += kThreads) {
    const float m = m_s[row];
    part_lse[row] = bad ? NAN : m == kNegInf ? kNegInf : m + acc_log(l_s[row]);
  }
}

template <typename T, int kLanes>
TilePlan plan_for(const DecodeParams& p, const DecodeDevice& dev) {
  using S = Tile<T, kLanes>;
  TilePlan tp;
  const int64_t R = p.G * p.n;
  int64_t cap = std::min<int64_t>(R, S::kMaxRows);
  while (cap > 0 && TileSmem<T, kLanes>(cap).total > dev.smem_optin) --cap;
  if (cap == 0) return tp;
  tp.row_blocks = (R + cap - 1) / cap;
  tp.rows_per_cta = (R + tp.row_blocks - 1) / tp.row_blocks;  // balanced blocks
  tp.lanes = kLanes;
  tp.smem = static_cast<size_t>(TileSmem<T, kLanes>(tp.rows_per_cta).total);
  // Enough CTAs for a few waves of two per SM whatever the batch; spans of at least two tiles
  // (a span's fixed costs, its queries in and its partial out, stay small).
  constexpr int64_t kCtasPerSm = 4;
  tp.split.tile = S::kKeys;
  tp.split.min_span = 2 * S::kKeys;
  const int64_t ctas_per_split = p.B * p.Hkv * tp.row_blocks;
  const int64_t want = (kCtasPerSm * dev.sms + ctas_per_split - 1) / ctas_per_split;
  const int64_t most = (p.C + tp.split.min_span - 1) / tp.split.min_span;
  tp.split.max_splits = std::max<int64_t>(1, std::min(want, most));
  return tp;
}

template <typename T>
bool rows_aligned(const void* base, const kv::SlotStrides& s) {
  constexpr int64_t kV = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && s.x % kV == 0 && s.y % kV == 0 &&
         s.h % kV == 0;
}

template <typename T, typename F>
auto with_lanes(int lanes, F&& f) {
  switch (lanes) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 32>{});
  }
}

template <typename T>
TilePlan plan_typed(const DecodeParams& p, const DecodeDevice& dev) {
  const int64_t bytes = p.D * static_cast<int64_t>(sizeof(T));
  const int lanes = static_cast<int>(bytes / 16);
  if (p.D != p.Dv || bytes % 16 != 0 || (lanes != 8 && lanes != 16 && lanes != 32) ||
      !rows_aligned<T>(p.k, p.ks) || !rows_aligned<T>(p.v, p.vs)) {
    return {};
  }
  TilePlan tp = with_lanes<T>(lanes, [&](auto l) { return plan_for<T, decltype(l)::value>(p, dev); });
  if (p.Hkv * tp.row_blocks > 65535 || p.B > 65535) return {};
  return tp;
}

template <typename T>
cudaError_t launch_typed(const DecodeParams& p, const TilePlan& tp, cudaStream_t stream) {
  return with_lanes<T>(tp.lanes, [&](auto l) {
    auto kernel = decode_tile_kernel<T, decltype(l)::value>;
    if (tp.smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(tp.smem));
      if (e != cudaSuccess) return e;
    }
    return launch_kernel(kernel,
                         dim3(static_cast<unsigned>(tp.split.max_splits),
                              static_cast<unsigned>(p.Hkv * tp.row_blocks),
                              static_cast<unsigned>(p.B)),
                         kThreads, tp.smem, stream, p, tp);
  });
}

}  // namespace

TilePlan plan_decode_tiles(const DecodeParams& p, KernelDtype dtype, const DecodeDevice& dev) {
  switch (dtype) {
    case KernelDtype::kFloat32: return plan_typed<float>(p, dev);
    case KernelDtype::kFloat16: return plan_typed<__half>(p, dev);
    case KernelDtype::kBFloat16: return plan_typed<__nv_bfloat16>(p, dev);
    case KernelDtype::kFloat64: break;
  }
  return {};
}

cudaError_t launch_decode_tiles(const DecodeParams& p, const TilePlan& tp, KernelDtype dtype,
                                cudaStream_t stream) {
  switch (dtype) {
    case KernelDtype::kFloat32: return launch_typed<float>(p, tp, stream);
    case KernelDtype::kFloat16: return launch_typed<__half>(p, tp, stream);
    case KernelDtype::kBFloat16: return launch_typed<__nv_bfloat16>(p, tp, stream);
    case KernelDtype::kFloat64: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace longattn::cuda
