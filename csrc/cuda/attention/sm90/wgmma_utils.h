// Warpgroup MMA helpers of the Hopper forward: one issue-and-wait of a tiled wgmma over the
// K extent, and the register views of its fp32 accumulator.
//
// A wgmma accumulator fragment is ((2, 2, N/8), MMA_M, MMA_N): per n8 block a thread holds two
// adjacent columns of two rows 8 apart. The four lanes of a quad share those rows, as with
// mma.sync, so row reductions are the same two quad shuffles.
#pragma once
#include <cute/tensor.hpp>

namespace longattn::cuda::sm90 {

// (row, column) view of an accumulator layout: rows (row pair, MMA_M), columns (column pair,
// n8 block, MMA_N); the column pair is the fastest column index.
template <class Layout>
__host__ __device__ __forceinline__ auto acc_rowcol_layout(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank<0>(acc))::value == 3, "a wgmma accumulator layout");
  auto v = get<0>(acc);
  return make_layout(make_layout(get<1>(v), get<1>(acc)),
                     make_layout(get<0>(v), get<2>(v), get<2>(acc)));
}

// The S accumulator, once converted to 16-bit, as the register A operand of an RS wgmma with
// K = the key columns: each k16 slice is two consecutive n8 blocks of S, which is exactly the
// A fragment's (column pair, row pair, k half) order.
template <class Layout>
__host__ __device__ __forceinline__ auto acc_as_a_layout(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank<0>(acc))::value == 3, "a wgmma accumulator layout");
  auto v = logical_divide(get<0>(acc), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(v), get<1>(v), get<2, 0>(v)), get<1>(acc),
                     make_layout(get<2, 1>(v), get<2>(acc)));
}

// C (+)= A B over the whole K extent, then waits for the warpgroup's MMAs to finish, so the
// caller may read C and release the shared-memory operands.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_gemm(TiledMma& mma, TA const& a, TB const& b, TC& c) {
  using namespace cute;
  // An SS operand is a tensor of shared-memory descriptors, itself in registers: tell the
  // register operand of an RS wgmma by its element type instead.
  constexpr bool kRegA = !is_same_v<typename TA::value_type, GMMA::DescriptorIterator::value_type>;
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
  for (int k = 0; k < size<2>(a); ++k) {
    gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
}

}  // namespace longattn::cuda::sm90
