// Launch template of the flash backward for one configuration (traits): the kernels as
// __global__ wrappers of the bodies, and the host sequence
//   delta -> [dsink] -> dK/dV (+ atomic dQ) -> dQ conversion            (default)
//   delta -> [dsink] -> dK/dV -> query-major dQ kernel                  (deterministic)
// and flash_bwd (instances.h) on it. Included only by the generated instance files.
#pragma once
#include <cuda_runtime_api.h>

#include <type_traits>

#include "cuda/attention/attention_launch.h"
#include "cuda/attention/flash/bwd_api.h"
#include "cuda/attention/flash/bwd_dkdv_kernel.h"
#include "cuda/attention/flash/bwd_dq_kernel.h"
#include "cuda/attention/flash/bwd_plan.h"
#include "cuda/attention/flash/instances.h"

namespace longattn::cuda::flash {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LONGATTN_FLASH_BWD_BODY(...)  // mma.sync bf16 / cp.async need SM80; never launched there
#else
#define LONGATTN_FLASH_BWD_BODY(...) __VA_ARGS__
#endif

template <class Kt, bool kSoftcap>
__global__ void __launch_bounds__(Kt::kNThreads, 1) flash_bwd_dkdv_kernel(const __grid_constant__ BwdParams bp) {
  extern __shared__ __align__(128) char smem[];
  LONGATTN_FLASH_BWD_BODY(dkdv_block<Kt, kSoftcap>(bp, smem, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);)
}

template <class Kt, bool kSoftcap>
__global__ void __launch_bounds__(Kt::kNThreads, 1) flash_bwd_dq_kernel(const __grid_constant__ BwdParams bp) {
  extern __shared__ __align__(128) char smem[];
  LONGATTN_FLASH_BWD_BODY(dq_block<Kt, kSoftcap>(bp, smem, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);)
}

template <typename Elem, int kHeadDim>
__global__ void __launch_bounds__(256) flash_bwd_delta_kernel(const __grid_constant__ BwdParams bp) {
  DeltaKernel<FlashDeviceOps, Elem, kHeadDim>::run(bp, blockIdx.x, threadIdx.x);
}

template <class Ops>
__global__ void __launch_bounds__(256) flash_bwd_dsink_kernel(const __grid_constant__ BwdParams bp) {
  __shared__ float red[DsinkKernel<Ops>::kThreads];
  DsinkKernel<Ops>::run(bp, red, blockIdx.x, threadIdx.x);
}

template <typename Elem>
__global__ void __launch_bounds__(256) flash_bwd_convert_dq_kernel(const __grid_constant__ BwdParams bp) {
  ConvertDqKernel<Elem>::run(bp, blockIdx.x, threadIdx.x);
}

// Launch a big-smem kernel: opt in to its dynamic shared memory first.
template <class Kernel>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream,
                             const BwdParams& bp) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(bp);
  return cudaGetLastError();
}

template <class Kt>
cudaError_t run_flash_bwd(const AttentionParams& p, const AttentionGrads& g, cudaStream_t stream) {
  using Elem = typename Kt::Elem;
  constexpr int D = Kt::kHeadDim;
  cudaError_t err = bwd_check<Kt>(p, g);
  if (err != cudaSuccess) return err;
  const BwdParams bp = make_bwd_params(p, g);
  const BwdPlan plan = bwd_plan<Kt>(bp, g.deterministic);
  auto dim = [](const Grid3& g3) {
    return dim3(static_cast<unsigned>(g3.x), static_cast<unsigned>(g3.y), static_cast<unsigned>(g3.z));
  };
  if (!plan.delta.empty()) {
    flash_bwd_delta_kernel<Elem, D><<<dim(plan.delta), DeltaKernel<FlashDeviceOps, Elem, D>::kThreads, 0, stream>>>(bp);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (!plan.dsink.empty()) {
    flash_bwd_dsink_kernel<FlashDeviceOps><<<dim(plan.dsink), DsinkKernel<FlashDeviceOps>::kThreads, 0, stream>>>(bp);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (!plan.dkdv.empty()) {
    auto kernel = plan.softcap ? flash_bwd_dkdv_kernel<Kt, true> : flash_bwd_dkdv_kernel<Kt, false>;
    if ((err = launch_with_smem(kernel, dim(plan.dkdv), Kt::kNThreads, Kt::kSmemDkdv, stream, bp)) != cudaSuccess) {
      return err;
    }
  }
  if (!plan.dq.empty()) {
    auto kernel = plan.softcap ? flash_bwd_dq_kernel<Kt, true> : flash_bwd_dq_kernel<Kt, false>;
    if ((err = launch_with_smem(kernel, dim(plan.dq), Kt::kNThreads, Kt::kSmemDq, stream, bp)) != cudaSuccess) {
      return err;
    }
  }
  if (!plan.convert.empty()) {
    flash_bwd_convert_dq_kernel<Elem><<<dim(plan.convert), ConvertDqKernel<Elem>::kThreads, 0, stream>>>(bp);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <FlashDtype kDtype, int kHeadDim, bool kNarrow>
cudaError_t flash_bwd(const AttentionParams& p, const AttentionGrads& g, cudaStream_t stream) {
  using Elem = std::conditional_t<kDtype == FlashDtype::kBf16, cutlass::bfloat16_t, cutlass::half_t>;
  return run_flash_bwd<DeviceBwdTraits<Elem, kHeadDim, kNarrow>>(p, g, stream);
}

}  // namespace longattn::cuda::flash
