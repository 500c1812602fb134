// The compaction kernels behind launch_compact (kvcache_launch.h), one translation unit each:
// compact_validate_kernel.cu (the keep lists, the paged tables, the remap plan) and
// compact_rows_kernel.cu (the in-place moves); compact_launch.cu carves the scratch and runs
// them in order.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/kernel_dtype.h"
#include "cuda/kvcache/kvcache_launch.h"

namespace longattn::cuda {

// CompactParams::scratch, carved (int32 elements each).
struct CompactScratch {
  int32_t* status = nullptr;        // B * H
  int32_t* block_status = nullptr;  // B * H
  int32_t* error_flag = nullptr;    // 1, zeroed
  int32_t* ticket = nullptr;        // 1, zeroed: the moves' chunk order
  int32_t* owner = nullptr;         // paged: num_blocks, set to kUnowned
  int32_t* remap = nullptr;         // paged: 3 * B * H * max_blocks (source, then the plan)
  int32_t* read_done = nullptr;     // B * H * chunks, zeroed
  int64_t rows_per_chunk = 1, chunks = 0;  // per (b, h)
};

constexpr int32_t kUnowned = 0x7f7f7f7f;  // the owner array's fill (a byte memset)
constexpr int32_t kRemapped = -2;         // remap plan: the new block keeps its old block
constexpr int32_t kMoved = -1;            // remap plan: the new block receives its rows

// Rows the moves take per CTA for this problem (from the row layout; compact_rows_kernel.cu).
int64_t compact_rows_per_chunk(const CompactParams& p, KernelDtype dtype);

cudaError_t launch_compact_validate(const CompactParams& p, const CompactScratch& s,
                                    cudaStream_t stream);
cudaError_t launch_compact_rows(const CompactParams& p, const CompactScratch& s,
                                KernelDtype dtype, cudaStream_t stream);

}  // namespace longattn::cuda
