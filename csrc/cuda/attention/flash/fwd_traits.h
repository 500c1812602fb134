// Compile-time shape of the tensor-core forward kernel for one (element type, head dim):
// tile sizes, the warp tiling of mma.sync, shared-memory layouts and the copy atoms that move
// data between global memory, shared memory and registers.
//
// Ops is the instruction policy (device_ops.h): FlashDeviceOps on the GPU, the host emulator's
// in tools/flash_emu; it supplies the MMA, ldmatrix and cp.async atoms and the kernel body's
// barriers, cp.async commit / wait and shuffles.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "cuda/attention/flash/device_ops.h"

namespace longattn::cuda::flash {

// Element: cute::half_t or cute::bfloat16_t.
template <typename Element_, int kHeadDim_, class Ops_>
struct FwdTraits {
  using Element = Element_;
  using Ops = Ops_;
  static_assert(std::is_same_v<Element, cute::half_t> || std::is_same_v<Element, cute::bfloat16_t>);

  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim % 32 == 0, "shared-memory rows are built from 32- or 64-element atoms");
  // 4 warps, each owning 16-row slices of the query tile. Tile sizes keep a thread's score
  // tile plus output accumulator within the register file:
  //   hd64:  128 rows (2 slices per warp) x 128 keys;
  //   hd96, hd128: 128 rows (2 slices per warp) x 64 keys;
  //   hd256:  64 rows (1 slice per warp)  x 64 keys (with 128 rows the 256-wide accumulator
  //           alone would take the whole register file).
  static constexpr int kBlockM = kHeadDim <= 128 ? 128 : 64;
  static constexpr int kBlockN = kHeadDim <= 64 ? 128 : 64;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = kNWarps * 32;

  // Warps stacked along M; the N extent 16 lets one ldmatrix.x4 feed two n8 MMAs.
  using MmaOp = typename Ops::template Mma<Element>;
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaOp>,
                                  cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;

  // Row-major tiles in 8 x 64 atoms (8 x 32 when the head dim is an odd multiple of 32, e.g.
  // 96). The 16-byte chunks of an atom row are XOR-permuted by the row index (rows of 128 bytes:
  // chunk ^= row % 8; of 64 bytes: chunk ^= (row / 2) % 4), so the 8 row addresses of an
  // ldmatrix (and the 16-byte cp.async stores of 8 threads in a column) fall in distinct banks.
  static constexpr int kAtomCols = kHeadDim % 64 == 0 ? 64 : 32;
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<kAtomCols == 64 ? 3 : 2, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kAtomCols>>, cute::Stride<cute::Int<kAtomCols>, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V seen as (head dim, keys): the B operand of O += P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  // Same shape without the swizzle: only used to size register fragments.
  using SmemLayoutVtShape = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));
  // The output tile is staged in Q's buffer (same shape) before 16-byte global stores.
  using SmemLayoutO = SmemLayoutQ;

  using SmemCopyQK = cute::Copy_Atom<typename Ops::LdsmN, Element>;
  using SmemCopyVt = cute::Copy_Atom<typename Ops::LdsmT, Element>;
  using SmemCopyO = cute::Copy_Atom<cute::AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  // Global <-> shared: 16 bytes per thread per access, one thread per 16-byte chunk of an atom
  // row, so 128 threads move 16 rows x 64 columns (32 rows x 32 columns) per step.
  static constexpr int kElemsPerAccess = 16 / int(sizeof(Element));
  static constexpr int kThreadsPerRow = kAtomCols / kElemsPerAccess;
  using GmemThreads = cute::Layout<cute::Shape<cute::Int<kNThreads / kThreadsPerRow>, cute::Int<kThreadsPerRow>>,
                                   cute::Stride<cute::Int<kThreadsPerRow>, cute::_1>>;
  using GmemValues = cute::Layout<cute::Shape<cute::_1, cute::Int<kElemsPerAccess>>>;
  using GmemLoad = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<typename Ops::CpAsync, Element>{}, GmemThreads{},
      GmemValues{}));
  using GmemStore = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::UniversalCopy<cute::uint128_t>, Element>{}, GmemThreads{}, GmemValues{}));

  static constexpr int kSmemQElems = int(cute::cosize(SmemLayoutQ{}));
  static constexpr int kSmemKVElems = int(cute::cosize(SmemLayoutKV{}));
  // Q (reused for O), one K tile, one V tile.
  static constexpr int kSmemBytes = (kSmemQElems + 2 * kSmemKVElems) * int(sizeof(Element));
};

}  // namespace longattn::cuda::flash
