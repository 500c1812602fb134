// CUDA decode attention over a per-head-length KV cache: flash-decoding with the CPU kernel's
// split (fixed chunks of kv::kDecodeChunk keys, common/kvcache_math.h) and its rules.
//
// 1. decode_chunk_kernel, one CTA per (chunk, kv head, batch): the G * n rows of the GQA group
//    (G query heads x n new tokens) against the chunk's keys, kRowBlock rows per pass. One
//    thread per key computes the logits of the pass's rows (query rows in shared memory), one
//    warp per row takes the max and the exp-sum, then threads own (row, feature vector) and
//    accumulate P.V over the chunk's keys in key order. Writes a partial (out, lse) per row,
//    and with a score buffer the logits themselves (linear in the cache length: G * n values
//    per cached key, read back by step 3 instead of recomputing q.k).
// 2. decode_combine_kernel, one warp per row: the log-sum-exp merge of the row's chunks in
//    chunk order (partial_weight, common/merge.h), the final out and lse.
// 3. decode_scores_kernel (with scores), one thread per cached key: scores[j] += sum over the
//    group's rows, in row order, of exp(logit - lse).
// No atomics anywhere: the results are the same on every run. fp32 accumulation (fp64 for
// fp64 caches).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/kvcache_math.h"
#include "common/merge.h"
#include "cuda/kvcache/kv_device.cuh"
#include "cuda/kvcache/kvcache_launch.h"

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
  int64_t total;
  __host__ __device__ explicit ChunkSmem(int64_t D) {
    probs = kRowBlock * D;
    row_max = probs + kRowBlock * kProbStride;
    row_sum = row_max + kRowBlock;
    total = row_sum + kRowBlock;
  }
};

__device__ __forceinline__ bool length_ok(int64_t L, int64_t C) { return L >= 0 && L <= C; }

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

// V elements per access (16 bytes when Vec, else 1).
template <typename T, int V, bool Vec>
__global__ void __launch_bounds__(kThreads) decode_chunk_kernel(const DecodeParams p) {
  using A = acc_t<T>;
  const int64_t c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t L = length_at(p.lengths, b, h);
  const int64_t j0 = c * kChunk;
  if (!length_ok(L, p.C) || j0 >= L) return;  // the combine reads only chunks below L
  const int nj = static_cast<int>(L - j0 < kChunk ? L - j0 : kChunk);
  const int64_t R = p.G * p.n, nch = gridDim.x, bh = b * p.Hkv + h;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const A ninf = static_cast<A>(-INFINITY);

  const ChunkSmem layout(p.D);
  A* smem = dynamic_smem<A>();
  A* qs = smem + layout.qs;
  A* probs = smem + layout.probs;
  A* row_max = smem + layout.row_max;
  A* row_sum = smem + layout.row_sum;

  const T* q = static_cast<const T*>(p.q) + (b * p.Hq + h * p.G) * p.n * p.D;  // row r at r * D
  const T* kb = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1] + j0 * p.vs[2];
  A* part_out = static_cast<A*>(p.part_out) + (bh * nch + c) * R * p.Dv;
  A* part_lse = static_cast<A*>(p.part_lse) + (bh * nch + c) * R;
  A* logits = p.logits ? static_cast<A*>(p.logits) + (bh * nch + c) * R * kChunk : nullptr;

  const bool has_key = tid < nj;
  const int64_t j = j0 + tid;
  const int64_t kpos = !has_key ? 0
                       : p.positions ? p.positions[b * p.ps[0] + h * p.ps[1] + j * p.ps[2]]
                                     : j;
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
      const T* kr = kb + j * p.ks[2];
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
        if (logits) logits[r * kChunk + tid] = s;
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
        const T* vc = vb + d0;
#pragma unroll 4
        for (int jj = 0; jj < nj; ++jj) {
          Elems<T, V, Vec> vv;
          vv.load(vc + jj * p.vs[2]);
          const A pj = prow[jj];
          if (::signbit(pj)) continue;  // masked (see above)
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += pj * to_acc(vv.v[e]);
        }
        const A inv = A(1) / row_sum[rr];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] *= inv;
      }
      A* o = part_out + (r0 + rr) * p.Dv + d0;
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = acc[e];
    }
    if (tid < rows) {
      const A m = row_max[tid];
      part_lse[r0 + tid] = m == ninf ? ninf : m + acc_log(row_sum[tid]);
    }
  }
}

// One warp per output row x = (b * Hkv + h) * G * n + r.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(const DecodeParams p,
                                                                  int64_t nch) {
  using A = acc_t<T>;
  const int64_t R = p.G * p.n;
  const int64_t x = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (x >= p.B * p.Hkv * R) return;  // whole warps
  const int64_t bh = x / R, r = x % R, b = bh / p.Hkv, h = bh % p.Hkv;
  const A ninf = static_cast<A>(-INFINITY);
  T* out = static_cast<T*>(p.out) + x * p.Dv;
  A* lse = static_cast<A*>(p.lse) + x;
  const int64_t L = length_at(p.lengths, b, h);
  if (!length_ok(L, p.C)) {  // bad input that was not read back to the host: NaN, not silence
    for (int64_t d = lane; d < p.Dv; d += 32) out[d] = from_acc<T>(static_cast<A>(NAN));
    if (lane == 0) *lse = static_cast<A>(NAN);
    return;
  }
  const int64_t used = (L + kChunk - 1) / kChunk;
  const A* pl = static_cast<const A*>(p.part_lse) + bh * nch * R + r;               // chunk c: c * R
  const A* po = static_cast<const A*>(p.part_out) + (bh * nch * R + r) * p.Dv;      // c * R * Dv
  A m = ninf;
  for (int64_t c = lane; c < used; c += 32) m = max_nan(m, pl[c * R]);
  m = warp_max(m);
  if (m == ninf) {
    // No finite logit: out 0, lse -inf when the row sees no key; NaN when it sees keys whose
    // logits are all -inf (common/softmax_row.h). Telling the two apart reads the row's mask,
    // only in this rare case.
    const bool has_qpos = p.q_positions != nullptr;
    const int64_t qp = has_qpos ? p.q_positions[b * p.qps[0] + (r % p.n) * p.qps[1]] : 0;
    bool sees = false;
    for (int64_t j = lane; j < L && !sees; j += 32) {
      const int64_t kpos = p.positions ? p.positions[b * p.ps[0] + h * p.ps[1] + j * p.ps[2]] : j;
      sees = kv::decode_visible(j, kpos, has_qpos, qp, p.window, p.sinks);
    }
    const A fill = __any_sync(0xffffffffu, sees) ? static_cast<A>(NAN) : A(0);
    for (int64_t d = lane; d < p.Dv; d += 32) out[d] = from_acc<T>(fill);
    if (lane == 0) *lse = fill == A(0) ? ninf : fill;
    return;
  }
  A sum = A(0);
  for (int64_t c = lane; c < used; c += 32) {
    if (pl[c * R] != ninf) sum += acc_exp(pl[c * R] - m);
  }
  sum = warp_sum(sum);
  const A inv = A(1) / sum;
  for (int64_t d = lane; d < p.Dv; d += 32) {
    A acc = A(0);
    for (int64_t c = 0; c < used; ++c) {
      const A w = partial_weight<A>(pl[c * R], m, inv);
      if (w != A(0)) acc += w * po[c * R * p.Dv + d];
    }
    out[d] = from_acc<T>(acc);
  }
  if (lane == 0) *lse = m + acc_log(sum);
}

template <typename A>
__global__ void __launch_bounds__(kThreads) decode_scores_kernel(const DecodeParams p) {
  const int64_t c = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t L = length_at(p.lengths, b, h);
  const int64_t j = c * kChunk + threadIdx.x;
  if (!length_ok(L, p.C) || j >= L) return;
  const int64_t R = p.G * p.n, nch = gridDim.x, bh = b * p.Hkv + h;
  const A ninf = static_cast<A>(-INFINITY);
  const A* lg = static_cast<const A*>(p.logits) + (bh * nch + c) * R * kChunk + threadIdx.x;
  const A* lse = static_cast<const A*>(p.lse) + bh * R;
  A total = A(0);
  for (int64_t r = 0; r < R; ++r) {  // rows in order: a fixed summation order
    const A lr = lse[r];
    // Masked keys (logit -inf) get nothing, also from a NaN row.
    if (lr != ninf && lg[r * kChunk] != ninf) total += acc_exp(lg[r * kChunk] - lr);
  }
  p.scores[b * p.ss[0] + h * p.ss[1] + j * p.ss[2]] += static_cast<float>(total);
}

// Every (b, h, slot) row of a cache tensor starts on a 16-byte boundary and the row length
// is a whole number of 16-byte vectors.
template <typename T>
bool rows_vectorizable(const void* base, const int64_t (&strides)[3], int64_t row_elems) {
  constexpr int64_t kV = 16 / sizeof(T);
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || row_elems % kV != 0) return false;
  for (int64_t s : strides) {
    if (s % kV != 0) return false;
  }
  return true;
}

template <typename T, int V, bool Vec>
cudaError_t launch_chunks(const DecodeParams& p, int64_t nch, cudaStream_t stream) {
  using A = acc_t<T>;
  const size_t smem = ChunkSmem(p.D).total * sizeof(A);
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
  using A = acc_t<T>;
  constexpr int kV = 16 / sizeof(T);
  const int64_t rows = p.B * p.Hkv * p.G * p.n;
  if (rows == 0) return cudaSuccess;
  const int64_t nch = (p.C + kChunk - 1) / kChunk;
  if (nch > 0x7fffffff || p.Hkv > 65535 || p.B > 65535) return cudaErrorInvalidConfiguration;
  if (nch > 0) {
    const bool vec = rows_vectorizable<T>(p.k, p.ks, p.D) && rows_vectorizable<T>(p.v, p.vs, p.Dv);
    const cudaError_t e = vec ? launch_chunks<T, kV, true>(p, nch, stream)
                              : launch_chunks<T, 1, false>(p, nch, stream);
    if (e != cudaSuccess) return e;
  }
  const int64_t warps_per_block = kThreads / 32;
  const int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t e = launch_kernel(decode_combine_kernel<T>, static_cast<unsigned>(blocks), kThreads,
                                0, stream, p, nch);
  if (e == cudaSuccess && p.scores != nullptr && nch > 0) {
    e = launch_kernel(decode_scores_kernel<A>,
                      dim3(static_cast<unsigned>(nch), static_cast<unsigned>(p.Hkv),
                           static_cast<unsigned>(p.B)),
                      kThreads, 0, stream, p);
  }
  return e;
}

}  // namespace

cudaError_t launch_decode(const DecodeParams& p, KernelDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case KernelDtype::kFloat32: return launch_typed<float>(p, stream);
    case KernelDtype::kFloat64: return launch_typed<double>(p, stream);
    case KernelDtype::kFloat16: return launch_typed<__half>(p, stream);
    case KernelDtype::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace longattn::cuda
