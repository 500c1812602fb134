// The instruction set of the flash kernels (forward and backward) as a policy type, so the
// kernel bodies are one code for the GPU and for the host emulator (tools/flash_emu), which
// substitutes warp-collective emulations of the same instructions.
//
// FlashDeviceOps is what the GPU runs: mma.sync m16n8k16 (fp32 accumulation), ldmatrix (plain
// and transposed), 16-byte cp.async with its commit / wait, __syncthreads (also its OR
// reduction), atomicAdd, shuffles and ballots.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

namespace longattn::cuda::flash {

template <typename Elem>
using Sm80MmaF32 = std::conditional_t<std::is_same_v<Elem, cutlass::half_t>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                      cute::SM80_16x8x16_F32BF16BF16F32_TN>;

#if defined(__CUDACC__)
struct FlashDeviceOps {
  template <typename Elem>
  using Mma = Sm80MmaF32<Elem>;
  using LdsmN = cute::SM75_U32x4_LDSM_N;  // 8x8 b16 matrices, row-major source
  using LdsmT = cute::SM75_U16x8_LDSM_T;  // the same, transposed on the way into registers
  using CpAsync = cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>;  // 16 bytes, L2 only

  static __device__ __forceinline__ void sync() { __syncthreads(); }
  // A barrier that also returns whether any thread of the block passed a non-zero value.
  static __device__ __forceinline__ int sync_or(int pred) { return __syncthreads_or(pred); }
  static __device__ __forceinline__ void cp_async_fence() { cute::cp_async_fence(); }
  template <int N>
  static __device__ __forceinline__ void cp_async_wait() { cute::cp_async_wait<N>(); }
  static __device__ __forceinline__ void atomic_add(float* dst, float v) { atomicAdd(dst, v); }
  static __device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
  }
  static __device__ __forceinline__ uint32_t ballot(bool pred) { return __ballot_sync(0xffffffffu, pred); }
};
#endif

}  // namespace longattn::cuda::flash
