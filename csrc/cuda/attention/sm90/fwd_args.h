// What the Hopper forward kernel receives: the call's parameters, the TMA descriptors of q, k
// and v (built on the host, fwd_launch.h; they must live in kernel-parameter memory), and the
// CTA's share of the work.
#pragma once
#include <cute/tensor.hpp>

#include "common/attention_params.h"
#include "cuda/attention/key_tiles.h"
#include "cuda/attention/sm90/fwd_traits.h"

namespace longattn::cuda::sm90 {

template <class Tr>
struct FwdArgs {
  AttentionParams p;
  typename Tr::TmaQ tma_q;
  typename Tr::TmaKV tma_k;
  typename Tr::TmaKV tma_v;
};

// Query tile m_block of q head h in (dense) sequence b, and the key tiles it visits. Every warp
// of the CTA builds the same one, so the producer and the consumers walk one list.
template <class Tr>
struct QueryTile {
  SeqInfo si;
  int m_block;
  int64_t h, hk, b, i0;
  int nq;
  KeyTiles<Tr::kBlockN> tiles;

  __host__ __device__ __forceinline__ QueryTile(const AttentionParams& p, int m_block_, int64_t h_, int64_t b_)
      : si(seq_info(p, b_)),
        m_block(m_block_),
        h(h_),
        hk(h_ / p.group()),
        b(b_),
        i0(static_cast<int64_t>(m_block_) * Tr::kBlockM),
        nq(static_cast<int>(min64(Tr::kBlockM, si.q_len - i0))),
        tiles(si.mask, i0, nq, si.k_len) {}
};

// q/k/v coordinates as the TMA descriptors index them: (row, head dim, head, batch).
template <class Tr>
__host__ __device__ __forceinline__ auto gmem_shape(int64_t rows, int64_t heads, int64_t batch) {
  return cute::make_shape(static_cast<int32_t>(rows), static_cast<int32_t>(Tr::kHeadDim),
                          static_cast<int32_t>(heads), static_cast<int32_t>(batch));
}

}  // namespace longattn::cuda::sm90
