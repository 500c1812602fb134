// The producer warp of the Hopper forward: one thread issues the TMA loads, Q once (its own
// barrier) and then K and V of each visible key tile through their 2-stage pipelines. It walks
// the same KeyTiles list as the consumers; tiles start at any key index (a window band need
// not be aligned to kBlockN), so each box is placed by a coordinate offset, and keys past the
// sequence arrive as zeros.
#pragma once
#include <cute/tensor.hpp>

#include "cuda/attention/sm90/fwd_args.h"

namespace longattn::cuda::sm90 {

template <class Tr>
__device__ __forceinline__ void produce_query_tile(const FwdArgs<Tr>& args, const QueryTile<Tr>& w,
                                                   typename Tr::SharedStorage& ss,
                                                   typename Tr::Pipeline& pipeline_k,
                                                   typename Tr::Pipeline& pipeline_v) {
  using namespace cute;
  using Element = typename Tr::Element;
  const AttentionParams& p = args.p;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutKV{});

  Tensor mQ = args.tma_q.get_tma_tensor(gmem_shape<Tr>(p.seqlen_q, p.heads_q, p.batch))(_, _, w.h, w.b);
  Tensor mK = args.tma_k.get_tma_tensor(gmem_shape<Tr>(p.seqlen_k, p.heads_kv, p.batch))(_, _, w.hk, w.b);
  Tensor mV = args.tma_v.get_tma_tensor(gmem_shape<Tr>(p.seqlen_k, p.heads_kv, p.batch))(_, _, w.hk, w.b);

  Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(w.m_block, _0{}));
  auto [tQg, tQs] = tma_partition(args.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                  group_modes<0, 2>(gQ));
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.barrier_q, Tr::kTmaBytesQ);
  copy(args.tma_q.with(ss.barrier_q), tQg, tQs);

  auto state = cutlass::make_producer_start_state<typename Tr::Pipeline>();
  const MaskParams& mask = p.mask;
  for (int t = w.tiles.next_visible(mask, 0); t < w.tiles.count; t = w.tiles.next_visible(mask, t + 1)) {
    int j0, nk;
    w.tiles.at(t, &j0, &nk);
    // Rows [j0, j0 + kBlockN) as one box; the rest mode has a single tile.
    Tensor gK = local_tile(domain_offset(make_coord(j0, _0{}), mK), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                           make_coord(_0{}, _0{}));
    Tensor gV = local_tile(domain_offset(make_coord(j0, _0{}), mV), Shape<Int<kBlockN>, Int<kHeadDim>>{},
                           make_coord(_0{}, _0{}));
    auto [tKg, tKs] = tma_partition(args.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                    group_modes<0, 2>(gK));
    auto [tVg, tVs] = tma_partition(args.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                    group_modes<0, 2>(gV));
    pipeline_k.producer_acquire(state);
    copy(args.tma_k.with(*pipeline_k.producer_get_barrier(state)), tKg, tKs(_, state.index()));
    pipeline_v.producer_acquire(state);
    copy(args.tma_v.with(*pipeline_v.producer_get_barrier(state)), tVg, tVs(_, state.index()));
    ++state;
  }
}

}  // namespace longattn::cuda::sm90
