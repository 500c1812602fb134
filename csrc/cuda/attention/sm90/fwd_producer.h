// The producer warp of the Hopper forward: one thread issues the TMA loads, Q once (its own
// barrier) and then K and V of each visible key tile through their 2-stage pipelines. It walks
// the same KeyTiles list as the consumers; keys past the sequence arrive as zeros.
#pragma once
#include <cute/tensor.hpp>

#include "cuda/attention/sm90/fwd_args.h"

namespace longattn::cuda::sm90 {

// The query tile's Q as TMA coordinates (row, head dim). Host and device: the host checks place
// it against the tensor's addresses.
template <class Tr>
CUTE_HOST_DEVICE auto q_tile(const FwdArgs<Tr>& args, const QueryTile<Tr>& w) {
  using namespace cute;
  const AttentionParams& p = args.p;
  Tensor mQ = args.tma_q.get_tma_tensor(gmem_shape<Tr>(p.seqlen_q, p.heads_q, p.batch))(_, _, w.h, w.b);
  return local_tile(mQ, Shape<Int<Tr::kBlockM>, Int<Tr::kHeadDim>>{}, make_coord(w.m_block, _0{}));
}

// The key tile at key index j0 of K or V (tma: args.tma_k or args.tma_v) as TMA coordinates.
// Tiles start at any key index (a window band need not be aligned to kBlockN), so the tile is
// placed by a coordinate offset.
template <class Tr, class Tma>
CUTE_HOST_DEVICE auto kv_tile(const Tma& tma, const AttentionParams& p, const QueryTile<Tr>& w, int j0) {
  using namespace cute;
  Tensor mKV = tma.get_tma_tensor(gmem_shape<Tr>(p.seqlen_k, p.heads_kv, p.batch))(_, _, w.hk, w.b);
  return local_tile(domain_offset(make_coord(j0, _0{}), mKV), Shape<Int<Tr::kBlockN>, Int<Tr::kHeadDim>>{},
                    make_coord(_0{}, _0{}));
}

// A tile's TMA boxes as copy() takes them: (global coordinates, shared destination[, stage]).
template <class Tma, class Smem, class Gmem>
__device__ __forceinline__ auto tma_boxes(const Tma& tma, const Smem& s, const Gmem& g) {
  using namespace cute;
  return tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(s), group_modes<0, 2>(g));
}

template <class Tr>
__device__ __forceinline__ void produce_query_tile(const FwdArgs<Tr>& args, const QueryTile<Tr>& w,
                                                   typename Tr::SharedStorage& ss,
                                                   typename Tr::Pipeline& pipeline_k,
                                                   typename Tr::Pipeline& pipeline_v) {
  using namespace cute;
  const AttentionParams& p = args.p;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutKV{});

  auto [tQg, tQs] = tma_boxes(args.tma_q, sQ, q_tile(args, w));
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.barrier_q, Tr::kTmaBytesQ);
  copy(args.tma_q.with(ss.barrier_q), tQg, tQs);

  auto state = cutlass::make_producer_start_state<typename Tr::Pipeline>();
  const MaskParams& mask = p.mask;
  for (int t = w.tiles.next_visible(mask, 0); t < w.tiles.count; t = w.tiles.next_visible(mask, t + 1)) {
    int j0, nk;
    w.tiles.at(t, &j0, &nk);
    auto [tKg, tKs] = tma_boxes(args.tma_k, sK, kv_tile(args.tma_k, p, w, j0));
    auto [tVg, tVs] = tma_boxes(args.tma_v, sV, kv_tile(args.tma_v, p, w, j0));
    pipeline_k.producer_acquire(state);
    copy(args.tma_k.with(*pipeline_k.producer_get_barrier(state)), tKg, tKs(_, state.index()));
    pipeline_v.producer_acquire(state);
    copy(args.tma_v.with(*pipeline_v.producer_get_barrier(state)), tVg, tVs(_, state.index()));
    ++state;
  }
}

}  // namespace longattn::cuda::sm90
