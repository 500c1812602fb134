// Host emulation of the flash attention forward (csrc/cuda/attention/flash/fwd_*): the same
// CTA body, grid, CTA -> (query tile, sequence) mapping, shared-memory size and instantiation
// choice as the CUDA build (fwd_launch.h, fwd_dispatch.cu), run on emulated threads (see
// emu_runtime.h). One element type per translation unit (emu_flash_fwd_fp16.cpp, _bf16.cpp) so
// the two compile in parallel; the C entry point is emu_flash_fwd.cpp.
#pragma once
#include "emu_host.h"

#include "cuda/attention/flash/fwd_kernel.h"
#include "cuda/attention/flash/fwd_plan.h"
#include "cuda/attention/flash/fwd_traits.h"

namespace emu {

template <class Tr, bool kPlainLogits>
void run_forward(const EmuArgs& a) {
  using namespace longattn;
  using namespace longattn::cuda::flash;
  const AttentionParams p = to_params(a);
  FwdGrid grid;
  const int64_t max_z = a.max_grid_z > 0 ? a.max_grid_z : kFwdMaxGridZ;
  if (fwd_grid<Tr, kPlainLogits>(p, &grid, max_z) != cudaSuccess) fail("fwd_grid rejected the arguments");
  Launcher launch(a);
  launch(grid.x, grid.y, grid.z, Tr::kNThreads, Tr::kSmemBytes,
         [&](int64_t x, int64_t y, int64_t z, int tid, char* smem) {
           const FwdCta cta = fwd_cta<Tr::kBlockM>(p.seqlen_q, unsigned(x), unsigned(z), unsigned(grid.z));
           if (cta.b >= p.batch) return;
           forward_query_tile<Tr, kPlainLogits>(p, cta.m_block, y, cta.b, reinterpret_cast<unsigned char*>(smem),
                                                tid);
         });
}

template <class Elem, int kHeadDim>
void forward_hd(const EmuArgs& a, bool plain) {
  using Tr = longattn::cuda::flash::FwdTraits<Elem, kHeadDim, EmuOps>;
  return plain ? run_forward<Tr, true>(a) : run_forward<Tr, false>(a);
}

// fwd_dispatch.cu's choice among the instantiations of one element type (a head dim in
// kFlashHeadDims, checked by the caller).
template <class Elem>
void forward(const EmuArgs& a) {
  const bool plain = to_params(a).score.plain();
  if (a.head_dim == 64) return forward_hd<Elem, 64>(a, plain);
  if (a.head_dim == 96) return forward_hd<Elem, 96>(a, plain);
  if (a.head_dim == 128) return forward_hd<Elem, 128>(a, plain);
  return forward_hd<Elem, 256>(a, plain);
}

extern template void forward<cutlass::half_t>(const EmuArgs&);
extern template void forward<cutlass::bfloat16_t>(const EmuArgs&);

}  // namespace emu
