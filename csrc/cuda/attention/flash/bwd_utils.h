// Small CuTe building blocks of the flash backward kernels: register-tile views, a GEMM that
// streams its operands from shared memory, predicated tile copies and fp32 -> fp16/bf16
// conversion. Instructions come from the traits' Ops policy (see bwd_traits.h).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

#if defined(__CUDACC__)
#define BWD_DEVICE __device__ __forceinline__
#else
#define BWD_DEVICE inline
#endif

namespace longattn::cuda::flash {

using namespace cute;


// An mma accumulator (4 values = 2 adjacent columns x 2 rows 8 apart, MMA_M, MMA_N) seen as
// (rows = (2, MMA_M), cols = (2, MMA_N)), so per-row quantities index the first mode.
template <class Layout>
BWD_DEVICE auto acc_rowcol(Layout const& acc) {
  static_assert(decltype(size<0>(acc))::value == 4);
  static_assert(decltype(rank(acc))::value == 3);
  auto l = logical_divide(acc, Shape<_2>{});  // ((2 cols, 2 rows), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// acc += A * B where A and B live in shared memory: each K slice is loaded into the register
// fragments (ldmatrix) one slice ahead of the mma that consumes it.
template <class TiledMma, class Acc, class FragA, class FragB, class SmemA, class SmemB, class CopyA,
          class CopyB>
BWD_DEVICE void gemm_smem(TiledMma const& mma, Acc& acc, FragA& rA, FragB& rB, SmemA const& sA,
                          SmemB const& sB, CopyA const& copy_a, CopyB const& copy_b) {
  Tensor rA_view = make_tensor(rA.data(), CopyA::retile(rA.layout()));
  Tensor rB_view = make_tensor(rB.data(), CopyB::retile(rB.layout()));
  CUTE_STATIC_ASSERT_V(size<1>(rA) == size<1>(acc));
  CUTE_STATIC_ASSERT_V(size<1>(rB) == size<2>(acc));
  CUTE_STATIC_ASSERT_V(size<2>(rA) == size<2>(rB));
  CUTE_STATIC_ASSERT_V(size<1>(sA) == size<1>(rA_view));
  CUTE_STATIC_ASSERT_V(size<1>(sB) == size<1>(rB_view));
  constexpr int kSlices = decltype(size<2>(rA))::value;
  cute::copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
  cute::copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
#pragma unroll
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) {
      cute::copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      cute::copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// One GEMM of the kernel: its tiled MMA, the thread's slice, and the ldmatrix copies that
// feed A and B from shared memory (transposed or not).
template <class TiledMma, class CopyAtomA, class CopyAtomB>
struct SmemGemm {
  TiledMma mma;
  decltype(make_tiled_copy_A(CopyAtomA{}, TiledMma{})) copy_a;
  decltype(make_tiled_copy_B(CopyAtomB{}, TiledMma{})) copy_b;
  int tid;
  BWD_DEVICE explicit SmemGemm(int tid_) : tid(tid_) {}

  // acc += A * B for A (M, K) and B (N, K) smem tensors.
  template <class Acc, class SA, class SB>
  BWD_DEVICE void run(Acc& acc, SA const& sA, SB const& sB) const {
    auto thr_mma = mma.get_thread_slice(tid);
    Tensor rA = thr_mma.partition_fragment_A(sA);
    Tensor rB = thr_mma.partition_fragment_B(sB);
    Tensor tsA = copy_a.get_thread_slice(tid).partition_S(sA);
    Tensor tsB = copy_b.get_thread_slice(tid).partition_S(sB);
    gemm_smem(mma, acc, rA, rB, tsA, tsB, copy_a, copy_b);
  }
};

// fp32 register tile -> Elem register tile with the same layout.
template <typename To, class Engine, class Layout>
BWD_DEVICE auto convert_frag(Tensor<Engine, Layout> const& src) {
  using From = typename Engine::value_type;
  constexpr int n = decltype(size(src))::value;
  static_assert(decltype(cosize(src.layout()))::value == n, "expects a compact fragment");
  Tensor dst = make_tensor<To>(src.layout());
  cutlass::NumericArrayConverter<To, From, n> conv;
  *reinterpret_cast<cutlass::Array<To, n>*>(raw_pointer_cast(dst.data())) =
      conv(*reinterpret_cast<cutlass::Array<From, n> const*>(raw_pointer_cast(src.data())));
  return dst;
}

// Rows [0, valid_rows) of a (rows x cols) tile with a tiled copy of 16-byte vectors. With
// kZeroFill the other rows of dst are zeroed with plain stores (visible after the same
// __syncthreads as the copies) and their source is never addressed; otherwise they are
// skipped.
template <class TiledCopy, bool kZeroFill, class Src, class Dst>
BWD_DEVICE void copy_rows(Src const& src, Dst& dst, int valid_rows, int tid) {
  TiledCopy copy;
  auto thr = copy.get_thread_slice(tid);
  Tensor ts = thr.partition_S(src);
  Tensor td = thr.partition_D(dst);
  Tensor tc = thr.partition_D(make_identity_tensor(make_shape(size<0>(dst), size<1>(dst))));
#pragma unroll
  for (int m = 0; m < size<1>(td); ++m) {
    if (get<0>(tc(0, m, 0)) < valid_rows) {
#pragma unroll
      for (int k = 0; k < size<2>(td); ++k) cute::copy(copy, ts(_, m, k), td(_, m, k));
    } else if constexpr (kZeroFill) {
      clear(td(_, m, _));
    }
  }
}

// Global -> smem (cp.async; rows past valid_rows zeroed), smem -> global.
template <class Kt, class GTensor, class STensor>
BWD_DEVICE void load_tile(GTensor const& g, STensor& s, int valid_rows, int tid) {
  copy_rows<typename Kt::GmemLoad, true>(g, s, valid_rows, tid);
}
template <class Kt, class STensor, class GTensor>
BWD_DEVICE void store_tile(STensor const& s, GTensor& g, int valid_rows, int tid) {
  copy_rows<typename Kt::GmemStore, false>(s, g, valid_rows, tid);
}

// An accumulator-shaped Elem register tile of `mma` -> its place in a smem tile.
template <class Kt, class TiledMma, class Frag, class STensor>
BWD_DEVICE void store_frag(TiledMma const& mma, Frag const& r, STensor& s, int tid) {
  auto copy = make_tiled_copy_C(typename Kt::SmemStoreAtom{}, mma);
  auto thr = copy.get_thread_slice(tid);
  Tensor src = thr.retile_S(r);
  Tensor dst = thr.partition_D(s);
  cute::copy(copy, src, dst);
}

}  // namespace longattn::cuda::flash
