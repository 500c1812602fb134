// Launch of the tensor-core forward for one traits type: the kernel as a __global__ wrapper of
// the CTA body (fwd_kernel.h) and its launch on fwd_plan.h's grid, and flash_fwd
// (instances.h) on it. Included only by the generated instance files, so each .cu compiles one
// kernel.
#pragma once
#include <cuda_runtime_api.h>

#include <type_traits>

#include "common/attention_params.h"
#include "cuda/attention/flash/fwd_kernel.h"
#include "cuda/attention/flash/fwd_plan.h"
#include "cuda/attention/flash/fwd_traits.h"
#include "cuda/attention/flash/instances.h"

namespace longattn::cuda::flash {

template <typename Element, int kHeadDim>
using DeviceFwdTraits = FwdTraits<Element, kHeadDim, FlashDeviceOps>;

template <FlashDtype kDtype>
using FlashElement = std::conditional_t<kDtype == FlashDtype::kBf16, cute::bfloat16_t, cute::half_t>;

// kPlainLogits: see forward_query_tile.
template <class Tr, bool kPlainLogits>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    flash_fwd_kernel(const __grid_constant__ AttentionParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const FwdCta cta = fwd_cta<Tr::kBlockM>(p.seqlen_q, blockIdx.x, blockIdx.z, gridDim.z);
  if (cta.b >= p.batch) return;
  forward_query_tile<Tr, kPlainLogits>(p, cta.m_block, blockIdx.y, cta.b, smem_raw,
                                       static_cast<int>(threadIdx.x));
}

template <class Tr, bool kPlainLogits>
cudaError_t launch_flash_fwd(const AttentionParams& p, cudaStream_t stream) {
  FwdGrid grid;
  const cudaError_t bad = fwd_grid<Tr, kPlainLogits>(p, &grid);
  if (bad != cudaSuccess || grid.empty()) return bad;

  const auto kernel = flash_fwd_kernel<Tr, kPlainLogits>;
  constexpr int kSmem = Tr::kSmemBytes;
  if constexpr (kSmem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  const dim3 dim(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y),
                 static_cast<unsigned>(grid.z));
  kernel<<<dim, Tr::kNThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <FlashDtype kDtype, int kHeadDim, bool kPlainLogits>
cudaError_t flash_fwd(const AttentionParams& p, cudaStream_t stream) {
  return launch_flash_fwd<DeviceFwdTraits<FlashElement<kDtype>, kHeadDim>, kPlainLogits>(p, stream);
}

}  // namespace longattn::cuda::flash
