// The tile configurations the flash backward is instantiated with, per (dtype, head dim).
//
// Wide: 64 query rows x 128 keys, 8 warps (FA2's sm80 choice for these head dims).
//   hd64:  88 KB smem (dK/dV kernel), 80 KB (dQ kernel): fits every SM80+ part.
//   hd96:  116 KB and 112 KB: A100 (164 KB) and H100/H200 (227 KB).
//   hd128: 144 KB and 144 KB: the same parts.
// Narrow (hd128 only): 64 x 64 keys, 96 KB / 88 KB, for SM86/SM89 parts (99 KB per block).
// hd256: 64 x 64 keys, 8 warps, 176 KB / 168 KB: H100/H200 only.
// Ops: FlashDeviceOps on the GPU, the emulator's ops in tools/flash_emu.
#pragma once
#include <cutlass/numeric_types.h>

#include "cuda/attention/flash/bwd_traits.h"

namespace longattn::cuda::flash {

template <typename Elem, int kHeadDim, bool kNarrow, class Ops>
struct BwdConfig;

template <typename Elem, class Ops>
struct BwdConfig<Elem, 64, false, Ops> {
  using Traits = BwdTraits<Elem, 64, 64, 128, 8, 2, 4, 4, Ops>;
};
template <typename Elem, class Ops>
struct BwdConfig<Elem, 96, false, Ops> {
  using Traits = BwdTraits<Elem, 96, 64, 128, 8, 2, 4, 4, Ops>;
};
template <typename Elem, class Ops>
struct BwdConfig<Elem, 128, false, Ops> {
  using Traits = BwdTraits<Elem, 128, 64, 128, 8, 2, 4, 2, Ops>;
};
template <typename Elem, class Ops>
struct BwdConfig<Elem, 128, true, Ops> {
  using Traits = BwdTraits<Elem, 128, 64, 64, 8, 2, 4, 2, Ops>;
};
template <typename Elem, class Ops>
struct BwdConfig<Elem, 256, false, Ops> {
  using Traits = BwdTraits<Elem, 256, 64, 64, 8, 4, 2, 2, Ops>;
};

}  // namespace longattn::cuda::flash
