// Before a compaction moves anything (compact_rows_kernel.cu):
//
// 1. compact_validate_kernel, one CTA per (b, h): the keep list checked by the CPU's rule
//    (kv::first_bad_keep_in over a range per thread; the smallest bad entry wins), the length and
//    count in range; a status per (b, h) and the global error flag. Paged, every table entry the
//    head's cached slots need claims its block: owner[block] = the smallest (b, h, entry) naming
//    it (atomicMin), an entry naming no block of the pool is a block error.
// 2. compact_plan_kernel (paged), one CTA per (b, h): an entry whose block has an earlier owner
//    is a shared block (moves are in place: an error); then the remap plan of common/kv_paged.h:
//    each new block's source block (remap_source), and remapped[jb] = source == jb || source >=
//    nb_new || remapped[source], resolved by pointer jumping (a chain of remaps follows sources
//    upward; log2 rounds); and the new table, which the host copies in when all is clean.
// The host reads the statuses back and raises the CPU's errors (nothing moved on the device).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common/kv_paged.h"
#include "common/kv_slots.h"
#include "common/kvcache_math.h"
#include "cuda/kvcache/compact_kernels.h"
#include "cuda/kvcache/kv_device.cuh"

namespace longattn::cuda {
namespace {

using namespace kv_device;

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t head_blocks(const CompactParams& p, int64_t L) {
  const int64_t bs = p.slots.block_size;
  return (L + bs - 1) / bs;
}

__global__ void __launch_bounds__(kThreads) compact_validate_kernel(const CompactParams p,
                                                                    const CompactScratch s) {
  const int64_t x = blockIdx.x, b = x / p.H, h = x % p.H;
  __shared__ int32_t first_bad, first_block;
  if (threadIdx.x == 0) {
    first_bad = INT_MAX;
    first_block = INT_MAX;
  }
  __syncthreads();
  const int64_t L = length_at(p.lengths, b, h), n = p.keep_lengths[x];
  const int64_t* ix = p.keep + x * p.K;
  int32_t status = kKeepOk;
  if (L < 0 || L > p.C) {
    status = kBadLength;
  } else if (n < 0 || n > p.K) {
    status = kBadKeepLength;
  } else {
    const int64_t per = (n + kThreads - 1) / kThreads;
    const int64_t begin = threadIdx.x * per, end = begin + per < n ? begin + per : n;
    if (begin < end) {
      const int64_t bad = kv::first_bad_keep_in(ix, 1, begin, end, L);
      if (bad >= 0) atomicMin(&first_bad, static_cast<int32_t>(bad));
    }
  }
  if (p.slots.paged() && L >= 0 && L <= p.C) {
    const int64_t M = p.C / p.slots.block_size;
    for (int64_t i = threadIdx.x; i < head_blocks(p, L); i += kThreads) {
      const int64_t id = p.slots.block_id(b, h, i);
      if (id < 0 || id >= p.slots.num_blocks) {
        atomicMin(&first_block, static_cast<int32_t>(2 * i));
      } else {
        atomicMin(&s.owner[id], static_cast<int32_t>(x * M + i));
      }
    }
  }
  __syncthreads();  // status is uniform over the CTA, so every thread reaches this
  if (status == kKeepOk && first_bad != INT_MAX) status = first_bad;
  if (threadIdx.x == 0) {
    s.status[x] = status;
    s.block_status[x] = first_block == INT_MAX ? kKeepOk : first_block;
    if (status != kKeepOk || first_block != INT_MAX) atomicExch(s.error_flag, 1);
  }
}

__global__ void __launch_bounds__(kThreads) compact_plan_kernel(const CompactParams p,
                                                                const CompactScratch s) {
  const int64_t x = blockIdx.x, b = x / p.H, h = x % p.H;
  const int64_t bs = p.slots.block_size, M = p.C / bs;
  __shared__ int32_t first_shared;
  if (threadIdx.x == 0) first_shared = INT_MAX;
  __syncthreads();
  const int64_t L = length_at(p.lengths, b, h), n = p.keep_lengths[x];
  const bool ok = s.status[x] == kKeepOk && s.block_status[x] == kKeepOk;
  if (ok) {
    for (int64_t i = threadIdx.x; i < head_blocks(p, L); i += kThreads) {
      const int64_t id = p.slots.block_id(b, h, i);
      if (s.owner[id] != static_cast<int32_t>(x * M + i)) {
        atomicMin(&first_shared, static_cast<int32_t>(2 * i + 1));
      }
    }
  }
  __syncthreads();
  if (first_shared != INT_MAX) {
    if (threadIdx.x == 0) {
      s.block_status[x] = first_shared;
      atomicExch(s.error_flag, 1);
    }
    return;  // uniform: nothing below runs for this head
  }
  if (!ok) return;

  // The remap plan (common/kv_paged.h). cur/nxt: kRemapped, kMoved, or a pending pointer to the
  // new block whose plan this one's follows.
  const int64_t* ix = p.keep + x * p.K;
  const int64_t nb_new = (n + bs - 1) / bs;
  int32_t* src = s.remap + 3 * x * M;
  int32_t* cur = src + M;
  int32_t* nxt = cur + M;
  for (int64_t jb = threadIdx.x; jb < nb_new; jb += kThreads) {
    const int64_t ob = kv::remap_source(ix, n, bs, jb, [&](int64_t j) {
      if (p.new_positions == nullptr) return false;
      const kv::Slot from = p.slots.locate(b, h, ix[j]);
      return p.new_positions[b * p.ns[0] + h * p.ns[1] + j * p.ns[2]] !=
             p.positions[p.ps.offset(from, h)];
    });
    src[jb] = static_cast<int32_t>(ob);
    cur[jb] = ob < 0 ? kMoved
              : kv::remap_allowed(jb, ob, nb_new, false) ? kRemapped
                                                         : static_cast<int32_t>(ob);
  }
  // A pending entry points at a new block further up; each round it takes its target's entry
  // (a final plan, or the target's own pointer): chains halve, so log2 rounds settle them all.
  for (int64_t len = 1; len < nb_new; len *= 2) {
    __syncthreads();
    for (int64_t jb = threadIdx.x; jb < nb_new; jb += kThreads) {
      nxt[jb] = cur[jb] >= 0 ? cur[cur[jb]] : cur[jb];
    }
    __syncthreads();
    for (int64_t jb = threadIdx.x; jb < nb_new; jb += kThreads) cur[jb] = nxt[jb];
  }
  __syncthreads();
  for (int64_t jb = threadIdx.x; jb < M; jb += kThreads) {
    int32_t id = -1;
    if (jb < nb_new) {
      const bool remapped = cur[jb] == kRemapped;
      id = static_cast<int32_t>(p.slots.block_id(b, h, remapped ? src[jb] : jb));
      cur[jb] = remapped ? kRemapped : kMoved;  // what the moves read
    }
    p.new_table[x * M + jb] = id;
  }
}

}  // namespace

cudaError_t launch_compact_validate(const CompactParams& p, const CompactScratch& s,
                                    cudaStream_t stream) {
  const int64_t bh = p.B * p.H;
  cudaError_t e = launch_kernel(compact_validate_kernel, static_cast<unsigned>(bh), kThreads, 0,
                                stream, p, s);
  if (e != cudaSuccess || !p.slots.paged()) return e;
  return launch_kernel(compact_plan_kernel, static_cast<unsigned>(bh), kThreads, 0, stream, p, s);
}

}  // namespace longattn::cuda
