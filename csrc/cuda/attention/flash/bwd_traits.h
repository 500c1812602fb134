// Compile-time shape of the flash attention backward: tile sizes, warp layouts of the three
// tensor-core GEMM families, shared-memory layouts and copy atoms.
//
// Ops is the instruction policy (device_ops.h): FlashDeviceOps on the GPU, the host emulator's
// in tools/flash_emu.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "cuda/attention/flash/device_ops.h"

namespace longattn::cuda::flash {

using namespace cute;

// kBlockM query rows x kBlockN keys per tile; kHeadDim the (exact) head dim.
// kAtomM* give how the warps split the M mode of each GEMM family:
//   SdP: S = Q K^T and dP = dO V^T        (M = queries, N = keys,      K = head dim)
//   dKV: dV += P^T dO, dK += dS^T Q       (M = keys,    N = head dim,  K = queries)
//   dQ:  dQ = dS K                        (M = queries, N = head dim,  K = keys)
template <typename Elem_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kAtomMSdP,
          int kAtomMdKV, int kAtomMdQ, typename Ops_>
struct BwdTraits {
  using Elem = Elem_;
  using Ops = Ops_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 32 == 0 && kBlockM % 64 == 0 && kBlockN % 64 == 0);
  static_assert(kNWarps % kAtomMSdP == 0 && kNWarps % kAtomMdKV == 0 && kNWarps % kAtomMdQ == 0);

  using MmaAtom = MMA_Atom<typename Ops::template Mma<Elem>>;
  template <int kAtomM>
  using TiledMmaFor = TiledMMA<MmaAtom, Layout<Shape<Int<kAtomM>, Int<kNWarps / kAtomM>, _1>>,
                               Tile<Int<16 * kAtomM>, Int<16 * kNWarps / kAtomM>, _16>>;
  using TiledMmaSdP = TiledMmaFor<kAtomMSdP>;
  using TiledMmadKV = TiledMmaFor<kAtomMdKV>;
  using TiledMmadQ = TiledMmaFor<kAtomMdQ>;

  // Every smem tile is built from 8 x 64 element atoms (8 rows of 128 bytes) with the
  // 3-bit XOR swizzle, so ldmatrix reads of 8 rows (plain or transposed) and the 16-byte
  // cp.async writes both hit 8 different bank groups. Tiles along a head dim that is an odd
  // multiple of 32 (96) use 8 x 32 atoms with the 2-bit swizzle (chunk ^= (row / 2) % 4), which
  // keeps those 8 rows in distinct bank groups too.
  static constexpr int kAtomCols = kHeadDim % 64 == 0 ? 64 : 32;
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemAtomD = decltype(composition(Swizzle<kAtomCols == 64 ? 3 : 2, 3, 3>{},
                                         Layout<Shape<_8, Int<kAtomCols>>, Stride<Int<kAtomCols>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtomD{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(SmemAtomD{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutS = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  // Transposed views of the same bytes: (head dim, queries), (head dim, keys), (keys, queries).
  using SmemLayoutQt = decltype(composition(SmemLayoutQ{},
                                            make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutKt = decltype(composition(SmemLayoutK{},
                                            make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutSt = decltype(composition(SmemLayoutS{},
                                            make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));

  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKElems = kBlockN * kHeadDim;
  static constexpr int kSElems = kBlockM * kBlockN;

  // Main (dK/dV) kernel: Q double-buffered, dO, K, V, dS, P.
  static constexpr int kSmemDkdv = (3 * kQElems + 2 * kKElems + 2 * kSElems) * int(sizeof(Elem));
  // Deterministic dQ kernel: Q, dO, K double-buffered, V, dS.
  static constexpr int kSmemDq = (2 * kQElems + 3 * kKElems + kSElems) * int(sizeof(Elem));

  using SmemCopyAtom = Copy_Atom<typename Ops::LdsmN, Elem>;
  using SmemCopyAtomT = Copy_Atom<typename Ops::LdsmT, Elem>;
  // Registers -> smem for accumulator-shaped tiles: the C fragment holds pairs of adjacent
  // columns, one 32-bit store each.
  using SmemStoreAtom = Copy_Atom<UniversalCopy<uint32_t>, Elem>;

  // Global <-> smem: 16-byte vectors, one thread per 16-byte chunk of an atom row (8 threads
  // per 64-column slab, 4 per 32-column one).
  static constexpr int kGmemVec = 16 / int(sizeof(Elem));
  static_assert(kGmemVec == 8);
  static constexpr int kGmemThreadsPerRow = kAtomCols / kGmemVec;
  static constexpr int kGmemRows = kNThreads / kGmemThreadsPerRow;
  using GmemThreads = Layout<Shape<Int<kGmemRows>, Int<kGmemThreadsPerRow>>, Stride<Int<kGmemThreadsPerRow>, _1>>;
  using GmemLoad = decltype(make_tiled_copy(Copy_Atom<typename Ops::CpAsync, Elem>{}, GmemThreads{},
                                            Layout<Shape<_1, _8>>{}));
  using GmemStore = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Elem>{},
                                             GmemThreads{}, Layout<Shape<_1, _8>>{}));
  static_assert(kBlockM % kGmemRows == 0 && kBlockN % kGmemRows == 0);
};

}  // namespace longattn::cuda::flash
