// Compile-time shape of the Hopper forward: one CTA = a 128-row query tile of one q head,
// three warpgroups (one TMA producer, two consumers of 64 query rows each), K and V streamed
// through a 2-stage pipeline of 128-key tiles. Shared memory uses the GMMA swizzle atoms so
// wgmma reads Q, K and V in place; V is also viewed transposed (head dim contiguous, an
// MN-major B operand) for O += P V.
#pragma once
// cute/tensor.hpp first: the SM90 atom headers assume the core it declares.
#include <cute/tensor.hpp>

#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <cstdint>

namespace longattn::cuda::sm90 {

template <typename Element_, int kHeadDim_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kBlockM = 64 * kConsumerWarpgroups;  // wgmma M is 64 per warpgroup
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 2;
  static constexpr int kNThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  // setmaxnreg: the producer needs a handful of registers, the consumers hold S, P and O.
  // 24 * 128 + 240 * 256 fits the 64K registers of an SM with one CTA resident.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;

  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "GMMA K extent and swizzle atoms");

  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kConsumerWarpgroups>, cute::_1, cute::_1>>;
  // S = Q K^T: both operands from shared memory, K-major.
  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kHeadDim>>>(),
      AtomLayout{}));
  // O += P V: P from registers (the converted S accumulator), V^T from shared memory, MN-major.
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kHeadDim>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      AtomLayout{}));

  // A head-dim row of 64 or 128 elements is a whole number of 128-byte swizzle rows.
  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // (head dim, key, stage) view of the V stages: the same bytes, indexed transposed.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_ordered_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
                                cute::Step<cute::_2, cute::_1, cute::_3>{})));

  // Global q/k/v as TMA sees them: (row, head dim, head, batch), head dim contiguous.
  using GmemShape = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using GmemStride = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;
  using GmemTensor = decltype(cute::make_tensor(cute::make_gmem_ptr(static_cast<const Element*>(nullptr)),
                                                GmemShape{}, GmemStride{}));
  using TmaQ = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{},
                                            cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{},
                                            cute::_1{}));
  using TmaKV = decltype(cute::make_tma_copy(cute::SM90_TMA_LOAD{}, GmemTensor{},
                                             cute::take<0, 2>(SmemLayoutKV{}),
                                             cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{},
                                             cute::_1{}));
  // A TMA box always lands whole (out-of-range rows as zeros), so a stage's byte count is fixed.
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesKV = kBlockN * kHeadDim * sizeof(Element);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = cutlass::PipelineState<kStages>;

  struct SharedStorage {
    // 1024-byte alignment: the period of the 128-byte swizzle pattern.
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 1024> v;
    alignas(8) uint64_t barrier_q;
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
  };
  static constexpr int kSmemBytes = static_cast<int>(sizeof(SharedStorage));
};

}  // namespace longattn::cuda::sm90
