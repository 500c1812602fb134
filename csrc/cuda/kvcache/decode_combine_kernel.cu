// After decode's split kernels (decode_tile_kernel.cu, decode_chunk_kernel.cu):
//
// 1. decode_combine_kernel, one warp per output row: the log-sum-exp merge of the row's
//    split partials in split order (partial_weight, common/merge.h), the final out and lse,
//    and the row rules of common/softmax_row.h (a row with no finite logit is out 0 / lse -inf
//    when it sees no key, NaN when it sees keys whose logits are all -inf).
// 2. decode_scores_kernel (with scores), one thread per cached slot: scores[j] += the sum over
//    the GQA group's rows, in row order, of exp(logit - lse), from the logits the split kernels
//    kept (linear in the cache length: G * n values per slot, read back instead of recomputing
//    q.k).
// No atomics: the same results on every run.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/kv_slots.h"
#include "common/kvcache_math.h"
#include "common/merge.h"
#include "cuda/kvcache/decode_kernels.h"
#include "cuda/kvcache/kv_device.cuh"

namespace longattn::cuda {
namespace {

using namespace kv_device;

constexpr int kThreads = 256;

__device__ __forceinline__ bool length_ok(int64_t L, int64_t C) { return L >= 0 && L <= C; }

// One warp per output row x = (b * Hkv + h) * G * n + r.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(const DecodeParams p,
                                                                  const DecodeSplit split) {
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
  const int64_t used = split.count(L), nsplit = split.max_splits;
  const A* pl = static_cast<const A*>(p.part_lse) + bh * nsplit * R + r;           // split c: c * R
  const A* po = static_cast<const A*>(p.part_out) + (bh * nsplit * R + r) * p.Dv;  // c * R * Dv
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
      const kv::Slot s = p.slots.locate(b, h, j);
      const int64_t kpos = p.positions && s.valid() ? p.positions[p.ps.offset(s, h)] : j;
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

// Grid (slot chunks of kThreads, Hkv, B).
template <typename A>
__global__ void __launch_bounds__(kThreads) decode_scores_kernel(const DecodeParams p) {
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t L = length_at(p.lengths, b, h);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (!length_ok(L, p.C) || j >= L) return;
  const kv::Slot slot = p.slots.locate(b, h, j);
  if (!slot.valid()) return;  // nothing to update where the table names no block
  const int64_t R = p.G * p.n, bh = b * p.Hkv + h;
  const A ninf = static_cast<A>(-INFINITY);
  const A* lg = static_cast<const A*>(p.logits) + bh * R * p.C + j;
  const A* lse = static_cast<const A*>(p.lse) + bh * R;
  A total = A(0);
  for (int64_t r = 0; r < R; ++r) {  // rows in order: a fixed summation order
    const A lr = lse[r];
    // Masked keys (logit -inf) get nothing, also from a NaN row.
    if (lr != ninf && lg[r * p.C] != ninf) total += acc_exp(lg[r * p.C] - lr);
  }
  p.scores[p.ss.offset(slot, h)] += static_cast<float>(total);
}

template <typename T>
cudaError_t launch_typed(const DecodeParams& p, const DecodeSplit& split, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t rows = p.B * p.Hkv * p.G * p.n;
  const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t e = launch_kernel(decode_combine_kernel<T>, static_cast<unsigned>(blocks), kThreads,
                                0, stream, p, split);
  if (e == cudaSuccess && p.scores != nullptr && p.C > 0) {
    const int64_t chunks = (p.C + kThreads - 1) / kThreads;
    if (chunks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    e = launch_kernel(decode_scores_kernel<A>,
                      dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(p.Hkv),
                           static_cast<unsigned>(p.B)),
                      kThreads, 0, stream, p);
  }
  return e;
}

}  // namespace

cudaError_t launch_decode_finish(const DecodeParams& p, const DecodeSplit& split,
                                 KernelDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case KernelDtype::kFloat32: return launch_typed<float>(p, split, stream);
    case KernelDtype::kFloat64: return launch_typed<double>(p, split, stream);
    case KernelDtype::kFloat16: return launch_typed<__half>(p, split, stream);
    case KernelDtype::kBFloat16: return launch_typed<__nv_bfloat16>(p, split, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace longattn::cuda
