// The Hopper (sm_90a) attention forward, FlashAttention-3's warp-specialized structure with
// longattn's masks: warpgroup 0 produces (TMA loads, fwd_producer.h), warpgroups 1 and 2 consume
// 64 query rows each (wgmma, softmax, epilogue: fwd_consumer.h). setmaxnreg moves registers
// from the producer to the consumers. Grid and CTA-to-tile mapping are the flash forward's
// (flash/fwd_plan.h), so the two forwards cover the same problems the same way.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/reg_reconfig.h>

#include "cuda/attention/flash/fwd_plan.h"
#include "cuda/attention/sm90/fwd_args.h"
#include "cuda/attention/sm90/fwd_consumer.h"
#include "cuda/attention/sm90/fwd_producer.h"

namespace longattn::cuda::sm90 {

template <class Tr>
__global__ void __launch_bounds__(Tr::kNThreads, 1) fwd_kernel(const __grid_constant__ FwdArgs<Tr> args) {
  using Pipeline = typename Tr::Pipeline;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Tr::SharedStorage*>(smem_raw);
  const AttentionParams& p = args.p;

  const flash::FwdCta cta = flash::fwd_cta<Tr::kBlockM>(p.seqlen_q, blockIdx.x, blockIdx.z, gridDim.z);
  if (cta.b >= p.batch) return;  // the whole CTA, before any barrier exists

  // Warp-uniform indices, so the role branches below do not diverge inside a warp.
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);
  const int warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 32, 0);
  if (warp == 0 && cute::elect_one_sync()) {
    cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(args.tma_v.get_tma_descriptor());
    cutlass::arch::ClusterTransactionBarrier::init(&ss.barrier_q, 1);
  }

  typename Pipeline::Params pp;
  pp.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;  // the thread that issues the loads
  pp.num_consumers = Tr::kConsumerThreads;
  pp.transaction_bytes = Tr::kTmaBytesKV;
  // Warp 0 initializes the pipelines' barriers; the CTA barrier publishes them.
  Pipeline pipeline_k(ss.pipeline_k, pp, cute::Shape<cute::_1, cute::_1, cute::_1>{});
  Pipeline pipeline_v(ss.pipeline_v, pp, cute::Shape<cute::_1, cute::_1, cute::_1>{});
  __syncthreads();

  const QueryTile<Tr> w(p, cta.m_block, blockIdx.y, cta.b);
  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Tr::kProducerRegs>();
    if (threadIdx.x == 0) produce_query_tile<Tr>(args, w, ss, pipeline_k, pipeline_v);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Tr::kConsumerRegs>();
    consume_query_tile<Tr>(args, w, ss, pipeline_k, pipeline_v, static_cast<int>(threadIdx.x) - 128);
  }
}

}  // namespace longattn::cuda::sm90
