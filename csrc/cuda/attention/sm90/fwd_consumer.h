// A consumer warpgroup of the Hopper forward: 64 query rows of the CTA's tile. Per visible key
// tile (the producer's list, in its order):
//   wait K | S = Q K^T (wgmma SS) | release K | mask (partial tiles only) | online softmax |
//   P = S as 16-bit registers | wait V | O += P V (wgmma RS) | release V
// Masking and the softmax are the flash forward's (flash/score_tile.h, flash/fwd_softmax.h):
// they work on (row, column) views of the accumulators and on tile coordinates from an identity
// tensor partitioned like the accumulator, so they hold for the wgmma layout unchanged.
#pragma once
#include <cute/tensor.hpp>

#include "cuda/attention/flash/device_ops.h"
#include "cuda/attention/flash/fwd_softmax.h"
#include "cuda/attention/flash/mma_utils.h"
#include "cuda/attention/flash/score_tile.h"
#include "cuda/attention/sm90/fwd_args.h"
#include "cuda/attention/sm90/fwd_epilogue.h"
#include "cuda/attention/sm90/wgmma_utils.h"

namespace longattn::cuda::sm90 {

// thread: index among the consumer threads, [0, kConsumerThreads).
template <class Tr>
__device__ __forceinline__ void consume_query_tile(const FwdArgs<Tr>& args, const QueryTile<Tr>& w,
                                                   typename Tr::SharedStorage& ss,
                                                   typename Tr::Pipeline& pipeline_k,
                                                   typename Tr::Pipeline& pipeline_v, int thread) {
  using namespace cute;
  using Element = typename Tr::Element;
  using Ops = flash::FlashDeviceOps;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;
  const AttentionParams& p = args.p;

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Tr::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Tr::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Tr::SmemLayoutVt{});

  typename Tr::TiledMmaQK mma_qk;
  typename Tr::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(thread);
  auto thr_pv = mma_pv.get_thread_slice(thread);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K) descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N = head dim, MMA_K = keys, stage)
  Tensor acc_o = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));

  Tensor coord_s = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor coord_s_rc = make_tensor(coord_s.data(), acc_rowcol_layout(coord_s.layout()));
  constexpr int kRows = decltype(size<0>(coord_s_rc))::value;

  const ScoreParams& sp = p.score;
  const int64_t p0 = w.tiles.p0;
  float row_scale[kRows];
#pragma unroll
  for (int mi = 0; mi < kRows; ++mi) {
    const int64_t pos = p0 + get<0>(coord_s_rc(mi, 0));
    // As the other kernels: scale * logn(p) in double, rounded once to fp32.
    row_scale[mi] = static_cast<float>(sp.scale * logn_factor(pos, sp.inv_log_logn_base));
  }
  // Only plain logits reach this kernel (sm90/support.h): the scale folds into the exponent.
  flash::OnlineSoftmax<kRows, Ops> softmax(row_scale, /*plain_logits=*/true);

  // Q's TMA was issued whatever the tile list holds; the wait also keeps the CTA alive until
  // that copy has landed.
  cutlass::arch::ClusterTransactionBarrier::wait(&ss.barrier_q, 0);

  typename Tr::PipelineState state;
  const MaskParams& mask = p.mask;
  for (int t = w.tiles.next_visible(mask, 0); t < w.tiles.count; t = w.tiles.next_visible(mask, t + 1)) {
    int j0, nk;
    w.tiles.at(t, &j0, &nk);
    const TileKind kind = w.tiles.kind(mask, j0, nk);
    const int64_t s0 = mask.k_start + j0;

    Tensor acc_s = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
    pipeline_k.consumer_wait(state);
    wgmma_gemm</*kZeroInit=*/true>(mma_qk, tSrQ, tSrK(_, _, _, state.index()), acc_s);
    pipeline_k.consumer_release(state);

    Tensor s_rc = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    // Keys past nk (the next range, or past the sequence as TMA zeros) are masked with the rest.
    if (kind != TileKind::kFull || nk < kBlockN) {
      flash::mask_scores(s_rc, coord_s_rc, flash::TileMask(mask, p0, s0, nk));
    }
    softmax.update(s_rc, acc_o_rc);

    Tensor probs = flash::convert_fragment<Element>(acc_s);
    Tensor probs_a = make_tensor(probs.data(), acc_as_a_layout(probs.layout()));
    pipeline_v.consumer_wait(state);
    wgmma_gemm</*kZeroInit=*/false>(mma_pv, probs_a, tOrV(_, _, _, state.index()), acc_o);
    pipeline_v.consumer_release(state);
    ++state;
  }

  const float sink = sp.has_sink_logit ? static_cast<float>(p.sink_logit(w.h)) : 0.f;
  float lse[kRows];
  softmax.finish(acc_o_rc, sp.has_sink_logit, sink, lse, [&](int mi) {
    return w.si.mask.row_sees_keys(w.i0 + get<0>(coord_s_rc(mi, 0)), w.si.k_len);
  });

  Tensor coord_o = thr_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor coord_o_rc = make_tensor(coord_o.data(), acc_rowcol_layout(coord_o.layout()));
  store_output<Tr>(p, w, acc_o_rc, coord_o_rc, lse, coord_s_rc);
}

}  // namespace longattn::cuda::sm90
