// launch_compact and compact_scratch_size (kvcache_launch.h): the int32 scratch carved into the
// kernels' buffers (compact_kernels.h), what needs a start value set, then validation (and the
// paged remap plan) and the moves, in stream order. The moves do nothing when the validation
// found an error; the host reads the statuses back.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kvcache/compact_kernels.h"

namespace longattn::cuda {
namespace {

// Offsets (int32 elements) of the scratch buffers, in CompactScratch's order; the buffers that
// start at zero (error flag, ticket, read flags) are contiguous.
struct Layout {
  int64_t status, block_status, error_flag, ticket, read_done, owner, remap, total;
  int64_t rows_per_chunk, chunks;
};

Layout layout(const CompactParams& p, KernelDtype dtype) {
  Layout l{};
  const int64_t bh = p.B * p.H;
  l.rows_per_chunk = compact_rows_per_chunk(p, dtype);
  l.chunks = (p.K + l.rows_per_chunk - 1) / l.rows_per_chunk;
  const bool paged = p.slots.paged();
  const int64_t M = paged ? p.C / p.slots.block_size : 0;
  l.status = 0;
  l.block_status = bh;
  l.error_flag = 2 * bh;
  l.ticket = l.error_flag + 1;
  l.read_done = l.ticket + 1;
  l.owner = l.read_done + bh * l.chunks;
  l.remap = l.owner + (paged ? p.slots.num_blocks : 0);
  l.total = l.remap + (paged ? 3 * bh * M : 0);
  return l;
}

}  // namespace

int64_t compact_scratch_size(const CompactParams& p, KernelDtype dtype) {
  return layout(p, dtype).total;
}

cudaError_t launch_compact(const CompactParams& p, KernelDtype dtype, cudaStream_t stream) {
  const int64_t bh = p.B * p.H;
  if (bh == 0) return cudaSuccess;
  if (bh > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const Layout l = layout(p, dtype);
  CompactScratch s;
  s.status = p.scratch + l.status;
  s.block_status = p.scratch + l.block_status;
  s.error_flag = p.scratch + l.error_flag;
  s.ticket = p.scratch + l.ticket;
  s.read_done = p.scratch + l.read_done;
  s.owner = p.slots.paged() ? p.scratch + l.owner : nullptr;
  s.remap = p.slots.paged() ? p.scratch + l.remap : nullptr;
  s.rows_per_chunk = l.rows_per_chunk;
  s.chunks = l.chunks;
  cudaError_t e = cudaMemsetAsync(s.error_flag, 0, (l.owner - l.error_flag) * sizeof(int32_t),
                                  stream);
  if (e == cudaSuccess && s.owner != nullptr && p.slots.num_blocks > 0) {
    e = cudaMemsetAsync(s.owner, 0x7f, p.slots.num_blocks * sizeof(int32_t), stream);  // kUnowned
  }
  if (e == cudaSuccess) e = launch_compact_validate(p, s, stream);
  if (e == cudaSuccess) e = launch_compact_rows(p, s, dtype, stream);
  return e;
}

}  // namespace longattn::cuda
