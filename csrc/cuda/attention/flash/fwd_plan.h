// The host side of one forward call, shared by the CUDA launcher (fwd_launch.h) and the host
// emulator (tools/flash_emu): the grid, and which query tile of which sequence each CTA owns.
//
// Grid: (query tiles x sequence chunks, q heads, min(sequences, max z)). Sequences past the z
// limit (many short varlen sequences) go to further chunks of x: b = z + gridDim.z * chunk.
// Within a chunk the query tiles run in reverse order: under causal masks the last tiles see
// the most keys, so they start first.
#pragma once
#include <cuda_runtime_api.h>

#include <climits>

#include "common/attention_params.h"

namespace longattn::cuda::flash {

constexpr int64_t kFwdMaxGridZ = 65535;  // the hardware's gridDim.z limit

struct FwdGrid {
  int64_t x = 0, y = 0, z = 0;
  bool empty() const { return x <= 0 || y <= 0 || z <= 0; }
};

// cudaSuccess with an empty grid when there is nothing to write; max_grid_z below the hardware
// limit only in the emulator (to reach the sequence folding with few sequences).
template <class Tr, bool kPlainLogits>
cudaError_t fwd_grid(const AttentionParams& p, FwdGrid* grid, int64_t max_grid_z = kFwdMaxGridZ) {
  *grid = FwdGrid{};
  if (p.head_dim != Tr::kHeadDim || p.score.plain() != kPlainLogits) return cudaErrorInvalidValue;
  const int64_t m_blocks = ceil_div(p.seqlen_q, Tr::kBlockM);
  if (m_blocks <= 0 || p.batch <= 0 || p.heads_q <= 0) return cudaSuccess;  // nothing to write
  // Query tiles on x (2^31 - 1), heads on y (65535), sequences on z.
  const int64_t z = min64(p.batch, max_grid_z);
  const int64_t chunks = ceil_div(p.batch, z);
  if (m_blocks * chunks > INT_MAX || p.heads_q > 65535) return cudaErrorInvalidValue;
  // Key indices are int32 in the kernel (varlen lengths are int32 anyway).
  if (p.seqlen_k > INT_MAX - Tr::kBlockN) return cudaErrorInvalidValue;
  *grid = FwdGrid{m_blocks * chunks, p.heads_q, z};
  return cudaSuccess;
}

// The CTA at (x, ., z) of a grid with grid_z sequences per chunk: query tile m_block of
// sequence b; b >= p.batch in the last chunk means no work.
struct FwdCta {
  int m_block;
  int64_t b;
};

template <int kBlockM>
LONGATTN_HD FwdCta fwd_cta(int64_t seqlen_q, unsigned x, unsigned z, unsigned grid_z) {
  const unsigned m_blocks = static_cast<unsigned>(ceil_div(seqlen_q, kBlockM));
  const unsigned chunk = x / m_blocks;
  return {static_cast<int>(m_blocks - 1 - (x - chunk * m_blocks)),
          z + static_cast<int64_t>(grid_z) * chunk};
}

}  // namespace longattn::cuda::flash
