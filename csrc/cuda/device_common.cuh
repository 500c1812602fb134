// Building blocks shared by the CUDA kernels: the accumulation type (fp32, fp64 for fp64, as
// the CPU kernels' acc_t), conversions to and from it, runs of N contiguous elements moved with
// one 16-byte access when aligned, warp reductions, the CTA's dynamic shared memory and the
// kernel launch. No ATen here.
//
// tools/simt_emu runs the kernels on the CPU to test them without a GPU: it defines
// LONGATTN_SIMT_EMULATION and supplies its own dynamic_smem, launch_kernel and cp_async, so the
// launchers run unchanged there (no <<<>>> outside launch_kernel, no extern __shared__
// outside dynamic_smem, no cp.async outside cp_async).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/softmax_row.h"

namespace longattn::cuda {

#ifndef LONGATTN_SIMT_EMULATION
// The CTA's dynamic shared memory, as A.
template <typename A>
__device__ __forceinline__ A* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<A*>(smem_raw);
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...); the launch error.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, const Args&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

// Asynchronous copies from global to shared memory (sm_80's cp.async): Bytes 4, 8 or 16, the
// destination zero-filled instead when !valid (src is then not read). They complete, in the
// groups cp_async_commit closes, at cp_async_wait<N>: every group but the newest N. The data
// travels without registers, so a kernel can keep a whole tile in flight per thread.
template <int Bytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool valid) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? Bytes : 0;
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem),
                 "n"(Bytes), "r"(src_bytes));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return static_cast<T>(x);
  }
}

// N contiguous elements; one 16-byte access when Vec (the caller checked the alignment).
template <typename T, int N, bool Vec>
struct alignas(Vec ? 16 : alignof(T)) Elems {
  T v[N];
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (Vec) {
      static_assert(sizeof(T) * N == 16, "vector accesses are 16 bytes");
      *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) v[e] = p[e];
    }
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (Vec) {
      *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) p[e] = v[e];
    }
  }
};

// Over the 32 lanes of a full warp, a fixed butterfly: the same result on every run.
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
  for (int o = 16; o > 0; o >>= 1) x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;  // NaN if a lane's was: a row's maximum keeps NaN (common/softmax_row.h)
}

}  // namespace longattn::cuda
