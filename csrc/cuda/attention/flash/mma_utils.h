// Register-fragment plumbing for mma.sync tiles built with CuTe (SM80 16x8x16 atoms):
// GEMM loops that feed the MMAs from shared memory through ldmatrix, views of an fp32
// accumulator as (rows, columns) or as the A operand of the next MMA, fp32 -> 16-bit
// conversion, and reductions over the 4 lanes that share an accumulator row.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace longattn::cuda::flash {

// acc += A B^T over the K mode, A and B read from shared memory k-slice by k-slice, the next
// slice's ldmatrix issued before the current slice's MMAs.
// rA/rB: register fragments (thr_mma.partition_fragment_A/B); sA/sB: the ldmatrix source
// partitions (thr_copy.partition_S) of the same tiles.
template <class Acc, class FragA, class FragB, class SrcA, class SrcB, class TiledMma,
          class CopyA, class CopyB>
__device__ __forceinline__ void gemm_smem_smem(Acc& acc, FragA& rA, FragB& rB, const SrcA& sA,
                                               const SrcB& sB, const TiledMma& mma,
                                               const CopyA& copy_a, const CopyB& copy_b,
                                               int thread) {
  using namespace cute;
  CUTE_STATIC_ASSERT_V(size<1>(rA) == size<1>(acc));  // M
  CUTE_STATIC_ASSERT_V(size<1>(rB) == size<2>(acc));  // N
  CUTE_STATIC_ASSERT_V(size<2>(rA) == size<2>(rB));   // K
  auto thr_a = copy_a.get_thread_slice(thread);
  auto thr_b = copy_b.get_thread_slice(thread);
  Tensor rA_dst = thr_a.retile_D(rA);
  Tensor rB_dst = thr_b.retile_D(rB);
  CUTE_STATIC_ASSERT_V(size<1>(sA) == size<1>(rA_dst));
  CUTE_STATIC_ASSERT_V(size<1>(sB) == size<1>(rB_dst));
  constexpr int kSlices = decltype(size<2>(rA))::value;
  copy(copy_a, sA(_, _, 0), rA_dst(_, _, 0));
  copy(copy_b, sB(_, _, 0), rB_dst(_, _, 0));
#pragma unroll
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) {
      copy(copy_a, sA(_, _, k + 1), rA_dst(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_dst(_, _, k + 1));
    }
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B^T with A already in registers (the probabilities) and B from shared memory.
template <class Acc, class FragA, class FragB, class SrcB, class TiledMma, class CopyB>
__device__ __forceinline__ void gemm_reg_smem(Acc& acc, const FragA& rA, FragB& rB,
                                              const SrcB& sB, const TiledMma& mma,
                                              const CopyB& copy_b, int thread) {
  using namespace cute;
  CUTE_STATIC_ASSERT_V(size<1>(rA) == size<1>(acc));
  CUTE_STATIC_ASSERT_V(size<1>(rB) == size<2>(acc));
  CUTE_STATIC_ASSERT_V(size<2>(rA) == size<2>(rB));
  auto thr_b = copy_b.get_thread_slice(thread);
  Tensor rB_dst = thr_b.retile_D(rB);
  CUTE_STATIC_ASSERT_V(size<1>(sB) == size<1>(rB_dst));
  constexpr int kSlices = decltype(size<2>(rA))::value;
  copy(copy_b, sB(_, _, 0), rB_dst(_, _, 0));
#pragma unroll
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) copy(copy_b, sB(_, _, k + 1), rB_dst(_, _, k + 1));
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// An SM80 accumulator fragment ((2 columns, 2 row halves), MMA_M, MMA_N) seen as
// (rows = (2, MMA_M), columns = (2, MMA_N)): mode 0 walks the rows this thread holds, mode 1
// its columns in that row.
template <class Layout>
__host__ __device__ constexpr auto acc_rowcol_layout(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(size<0>(acc))::value == 4);
  static_assert(decltype(rank<0>(acc))::value == 2);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<2>(acc)));
}

// The same fragment as the A operand of a 16x8x16 MMA whose K runs over the accumulator's
// columns: two adjacent n8 accumulator tiles hold exactly one k16 A fragment
// ((2, 2, 2), MMA_M, MMA_N / 2).
template <class Layout>
__host__ __device__ constexpr auto acc_as_a_layout(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(size<0>(acc))::value == 4);
  static_assert(decltype(size<2>(acc))::value % 2 == 0);
  auto split = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // (4, M, (2, N/2))
  return make_layout(make_layout(get<0>(split), get<2, 0>(split)), get<1>(split),
                     get<2, 1>(split));
}

// Pairs of fp32 -> one packed 16-bit pair (round to nearest).
template <typename Element>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_pair<cute::half_t>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return reinterpret_cast<const uint32_t&>(h);
}

template <>
__device__ __forceinline__ uint32_t pack_pair<cute::bfloat16_t>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return reinterpret_cast<const uint32_t&>(h);
}

// A register tensor of Element with src's layout. src must be a compact register fragment
// (element i at offset i) with an even size, as MMA accumulators are.
template <typename Element, class Tensor>
__device__ __forceinline__ auto convert_fragment(const Tensor& src) {
  using namespace cute;
  constexpr int kSize = decltype(size(src))::value;
  static_assert(kSize % 2 == 0);
  static_assert(decltype(cosize(src.layout()))::value == kSize, "expects a compact fragment");
  auto dst = make_tensor<Element>(src.layout());
  uint32_t* d = reinterpret_cast<uint32_t*>(raw_pointer_cast(dst.data()));
  const float* s = raw_pointer_cast(src.data());
#pragma unroll
  for (int i = 0; i < kSize / 2; ++i) d[i] = pack_pair<Element>(s[2 * i], s[2 * i + 1]);
  return dst;
}

// The 4 lanes of a quad (lane / 4 equal) hold one accumulator row between them. Ops: the
// instruction policy (device_ops.h) that provides the shuffle.
template <class Ops>
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, Ops::shfl_xor(x, 1));
  return fmaxf(x, Ops::shfl_xor(x, 2));
}

template <class Ops>
__device__ __forceinline__ float quad_sum(float x) {
  x += Ops::shfl_xor(x, 1);
  return x + Ops::shfl_xor(x, 2);
}

}  // namespace longattn::cuda::flash
