// Host side of the Hopper forward for one traits type: the TMA descriptors (fwd_tma.h), the
// grid (flash/fwd_plan.h's), the shared-memory opt-in and the launch. Included only by the
// instance files, so each .cu compiles one kernel.
#pragma once
#include <cuda_runtime_api.h>

#include <type_traits>

#include "cuda/attention/flash/fwd_plan.h"
#include "cuda/attention/sm90/fwd_kernel.h"
#include "cuda/attention/sm90/fwd_tma.h"
#include "cuda/attention/sm90/fwd_traits.h"
#include "cuda/attention/sm90/instances.h"

namespace longattn::cuda::sm90 {

template <class Tr>
cudaError_t launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  using namespace cute;
  flash::FwdGrid grid;
  const cudaError_t bad = flash::fwd_grid<Tr, /*kPlainLogits=*/true>(p, &grid);
  if (bad != cudaSuccess || grid.empty()) return bad;
  if (p.seqlen_k <= 0 || p.heads_kv <= 0) return cudaErrorInvalidValue;  // no empty TMA extents

  const FwdArgs<Tr> args = make_fwd_args<Tr>(p);

  const auto kernel = fwd_kernel<Tr>;
  constexpr int kSmem = Tr::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  const dim3 dim(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z));
  kernel<<<dim, Tr::kNThreads, kSmem, stream>>>(args);
  return cudaGetLastError();
}

template <Sm90Dtype kDtype, int kHeadDim>
cudaError_t sm90_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Element = std::conditional_t<kDtype == Sm90Dtype::kBf16, cute::bfloat16_t, cute::half_t>;
  return launch_fwd<FwdTraits<Element, kHeadDim>>(p, stream);
}

}  // namespace longattn::cuda::sm90
