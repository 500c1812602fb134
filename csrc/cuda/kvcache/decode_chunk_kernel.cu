// The generic decode kernel: every cache the tile kernel (decode_tile_kernel.cu) does not take
// (fp64, head dims other than 8/16/32 16-byte vectors, unaligned rows, Dv != D), contiguous or
// paged. Flash-decoding with the CPU kernel's split: fixed chunks of kv::kDecodeChunk keys
// (common/kvcache_math.h), one CTA per (chunk, kv head, batch).
//
// The CTA takes the G * n rows of the GQA group (G query heads x n new tokens) against its
// chunk, kRowBlock rows per pass. One thread per key computes the logits of the pass's rows
// (query rows in shared memory), one warp per row takes the max and the exp-sum, then threads
// own (row, feature vector) and accumulate P.V over the chunk's keys in key order. It writes a
// partial (out, lse) per row for decode_combine_kernel.cu, and with a score buffer the logits.
// fp32 accumulation (fp64 for fp64 caches); no atomics.
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
constexpr int kChunk = static_cast<int>(kv::kDecodeChunk);
static_assert(kChunk == kThreads, "one thread per key of a chunk");
constexpr int kRowBlock = kThreads / 32;  // rows per pass: one warp per row for the softmax
constexpr int kProbStride = kChunk + 1;   // padded rows of probabilities (no bank conflicts)

// The chunk kernel's shared memory, all of it dynamic (elements of A): the launch opts in past
// 48 KiB from this size alone, so no static __shared__ array may add to it.
struct ChunkSmem {
  int64_t qs = 0;            // [kRowBlock][D] query rows of the pass
  int64_t probs;             // [kRowBlock][kProbStride] logits, then exp(s - max)
  int64_t row_max, row_sum;  // [kRowBlock] each
  int64_t voff;              // [kChunk] int64: element offsets of the chunk's value rows
  int64_t total;
  __host__ __device__ ChunkSmem(int64_t D, int64_t elem) {
    probs = kRowBlock * D;
    row_max = probs + kRowBlock * kProbStride;
    row_sum = row_max + kRowBlock;
    const int64_t per = 8 / elem;  // elements per int64
    voff = (row_sum + kRowBlock + per - 1) / per * per;
    total = voff + kChunk * 8 / elem;
  }
};

// acc + q[0..V) . k[0..V): q from shared memory, 16-byte loads when Vec.
template <typename A, int V, bool Vec>
__device__ __forceinline__ A dot_step(const A* q, const A (&k)[V], A acc) {
  if constexpr (Vec && std::is_same_v<A, float>) {
#pragma unroll
    for (int e = 0; e < V; e += 4) {
      const float4 x = *reinterpret_cast<const float4*>(q + e);
      acc += x.x * k[e] + x.y * k[e + 1] + x.z * k[e + 2] + x.w * k[e + 3];
    }
  } else if constexpr (Vec && std::is_same_v<A, double>) {
#pragma unroll
    for (int e = 0; e < V; e += 2) {
      const double2 x = *reinterpret_cast<const double2*>(q + e);
      acc += x.x * k[e] + x.y * k[e + 1];
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) acc += q[e] * k[e];
  }
  return acc;
}

template <typename T, int V, bool Vec>
__global__ void __launch_bounds__(kThreads) decode_chunk_kernel(const DecodeParams p) {
  using A = acc_t<T>;
  const int64_t c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t L = length_at(p.lengths, b, h);
  const int64_t j0 = c * kChunk;
  if (L < 0 || L > p.C || j0 >= L) return;  // the combine reads only chunks below L
  const int nj = static_cast<int>(L - j0 < kChunk ? L - j0 : kChunk);
  const int64_t R = p.G * p.n, nch = gridDim.x, bh = b * p.Hkv + h;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const A ninf = static_cast<A>(-INFINITY);

  const ChunkSmem layout(p.D, sizeof(A));
  A* smem = dynamic_smem<A>();
  A* qs = smem + layout.qs;
  A* probs = smem + layout.probs;
  A* row_max = smem + layout.row_max;
  A* row_sum = smem + layout.row_sum;
  int64_t* voff = reinterpret_cast<int64_t*>(smem + layout.voff);

  const T* q = static_cast<const T*>(p.q) + bh * R * p.D;  // row r at r * D
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  A* part_out = static_cast<A*>(p.part_out) + (bh * nch + c) * R * p.Dv;
  A* part_lse = static_cast<A*>(p.part_lse) + (bh * nch + c) * R;
  A* logits = p.logits ? static_cast<A*>(p.logits) + bh * R * p.C : nullptr;

  const int64_t j = j0 + tid;
  const kv::Slot slot = tid < nj ? p.slots.locate(b, h, j) : kv::Slot{-1, 0};
  const bool has_key = slot.valid();
  // A key whose block the table does not name (paged; bad input) turns the chunk's rows NaN.
  const bool bad = __syncthreads_or(tid < nj && !has_key) != 0;
  voff[tid] = has_key ? p.vs.offset(slot, h) : 0;
  const int64_t kpos = !has_key ? 0 : p.positions ? p.positions[p.ps.offset(slot, h)] : j;
  const bool has_qpos = p.q_positions != nullptr;
  const A scale = static_cast<A>(p.scale);
  const int64_t nfv = p.Dv / V;  // feature vectors per value row

  for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
    const int rows = static_cast<int>(R - r0 < kRowBlock ? R - r0 : kRowBlock);
    __syncthreads();  // the previous pass is done with qs, probs, row_max and row_sum
    for (int64_t e = tid; e < kRowBlock * p.D; e += kThreads) {
      qs[e] = e < rows * p.D ? to_acc(q[r0 * p.D + e]) : A(0);
    }
    __syncthreads();

    if (has_key) {
      A dot[kRowBlock];
#pragma unroll
      for (int rr = 0; rr < kRowBlock; ++rr) dot[rr] = A(0);
      const T* kr = kbase + p.ks.offset(slot, h);
      for (int64_t d = 0; d < p.D; d += V) {
        Elems<T, V, Vec> key;
        key.load(kr + d);
        A kf[V];
#pragma unroll
        for (int e = 0; e < V; ++e) kf[e] = to_acc(key.v[e]);
#pragma unroll
        for (int rr = 0; rr < kRowBlock; ++rr) {
          if (rr < rows) dot[rr] = dot_step<A, V, Vec>(qs + rr * p.D + d, kf, dot[rr]);
        }
      }
#pragma unroll
      for (int rr = 0; rr < kRowBlock; ++rr) {
        if (rr >= rows) break;
        const int64_t r = r0 + rr;
        const int64_t qp = has_qpos ? p.q_positions[b * p.qps[0] + (r % p.n) * p.qps[1]] : 0;
        const A s = kv::decode_visible(j, kpos, has_qpos, qp, p.window, p.sinks) ? dot[rr] * scale
                                                                                 : ninf;
        probs[rr * kProbStride + tid] = s;
        if (logits) logits[r * p.C + j] = s;
      }
    } else if (tid < nj) {
#pragma unroll
      for (int rr = 0; rr < kRowBlock; ++rr) {
        if (rr < rows) probs[rr * kProbStride + tid] = ninf;
      }
    }
    __syncthreads();

    if (warp < rows) {
      A* row = probs + warp * kProbStride;
      A m = ninf;
      for (int jj = lane; jj < nj; jj += 32) m = max_nan(m, row[jj]);
      m = warp_max(m);
      A l = A(0);
      for (int jj = lane; jj < nj; jj += 32) {
        // Keys with a -inf logit (masked) get -0.0, which P.V skips: 0 * v would carry a
        // non-finite value to rows that do not see it (docs/semantics.md).
        const A e = row[jj] == ninf ? A(-0.0) : acc_exp(row[jj] - m);
        row[jj] = e;
        l += e;
      }
      l = warp_sum(l);
      if (lane == 0) {
        row_max[warp] = m;
        row_sum[warp] = l;
      }
    }
    __syncthreads();

    for (int64_t u = tid; u < rows * nfv; u += kThreads) {
      const int rr = static_cast<int>(u / nfv);
      const int64_t d0 = (u % nfv) * V;
      A acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = A(0);
      if (row_max[rr] != ninf) {
        const A* prow = probs + rr * kProbStride;
#pragma unroll 4
        for (int jj = 0; jj < nj; ++jj) {
          const A pj = prow[jj];
          if (::signbit(pj)) continue;  // masked (see above)
          Elems<T, V, Vec> vv;
          vv.load(vbase + voff[jj] + d0);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += pj * to_acc(vv.v[e]);
        }
        const A inv = A(1) / row_sum[rr];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] *= inv;
      }
      A* o = part_out + (r0 + rr) * p.Dv + d0;
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = bad ? static_cast<A>(NAN) : acc[e];
    }
    if (tid < rows) {
      const A m = row_max[tid];
      part_lse[r0 + tid] = bad ? static_cast<A>(NAN) : m == ninf ? ninf : m + acc_log(row_sum[tid]);
    }
  }
}

// Every slot row of a cache tensor starts on a 16-byte boundary and the row length is a whole
// number of 16-byte vectors.
template <typename T>
bool rows_vectorizable(const void* base, const kv::SlotStrides& s, int64_t row_elems) {
  constexpr int64_t kV = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_elems % kV == 0 && s.x % kV == 0 &&
         s.y % kV == 0 && s.h % kV == 0;
}

template <typename T, int V, bool Vec>
cudaError_t launch_chunks(const DecodeParams& p, int64_t nch, cudaStream_t stream) {
  using A = acc_t<T>;
  const size_t smem = ChunkSmem(p.D, sizeof(A)).total * sizeof(A);
  auto kernel = decode_chunk_kernel<T, V, Vec>;
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  return launch_kernel(kernel,
                       dim3(static_cast<unsigned>(nch), static_cast<unsigned>(p.Hkv),
                            static_cast<unsigned>(p.B)),
                       kThreads, smem, stream, p);
}

template <typename T>
cudaError_t launch_typed(const DecodeParams& p, cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(T);
  const int64_t nch = chunk_split(p).max_splits;
  if (nch > 0x7fffffff || p.Hkv > 65535 || p.B > 65535) return cudaErrorInvalidConfiguration;
  const bool vec = rows_vectorizable<T>(p.k, p.ks, p.D) && rows_vectorizable<T>(p.v, p.vs, p.Dv);
  return vec ? launch_chunks<T, kV, true>(p, nch, stream) : launch_chunks<T, 1, false>(p, nch, stream);
}

}  // namespace

DecodeSplit chunk_split(const DecodeParams& p) {
  DecodeSplit s;
  s.tile = s.min_span = kChunk;
  s.max_splits = std::max<int64_t>(1, (p.C + kChunk - 1) / kChunk);
  return s;
}

cudaError_t launch_decode_chunks(const DecodeParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (p.C == 0) return cudaSuccess;  // every length is 0 (or bad): nothing to read
  switch (dtype) {
    case KernelDtype::kFloat32: return launch_typed<float>(p, stream);
    case KernelDtype::kFloat64: return launch_typed<double>(p, stream);
    case KernelDtype::kFloat16: return launch_typed<__half>(p, stream);
    case KernelDtype::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace longattn::cuda
