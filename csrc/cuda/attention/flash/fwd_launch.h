// Launch of the tensor-core forward for one traits type; included only by the per-(dtype,
// head dim) instantiation files, so each .cu compiles one kernel.
#pragma once
#include <cuda_runtime_api.h>

#include <climits>

#include "common/attention_params.h"
#include "cuda/attention/flash/fwd_kernel.h"
#include "cuda/attention/flash/fwd_traits.h"

namespace longattn::cuda::flash {

template <class Tr, bool kPlainLogits>
cudaError_t launch_flash_fwd(const AttentionParams& p, cudaStream_t stream) {
  if (p.head_dim != Tr::kHeadDim || p.score.plain() != kPlainLogits) return cudaErrorInvalidValue;
  const int64_t m_blocks = ceil_div(p.seqlen_q, Tr::kBlockM);
  if (m_blocks <= 0 || p.batch <= 0 || p.heads_q <= 0) return cudaSuccess;  // nothing to write
  // Query tiles on x (2^31 - 1), heads on y (65535), sequences on z (65535; more go to further
  // chunks of x, see flash_fwd_kernel).
  const int64_t z = min64(p.batch, 65535);
  const int64_t chunks = ceil_div(p.batch, z);
  if (m_blocks * chunks > INT_MAX || p.heads_q > 65535) return cudaErrorInvalidValue;
  // Key indices are int32 in the kernel (varlen lengths are int32 anyway).
  if (p.seqlen_k > INT_MAX - Tr::kBlockN) return cudaErrorInvalidValue;

  const auto kernel = flash_fwd_kernel<Tr, kPlainLogits>;
  constexpr int kSmem = Tr::kSmemBytes;
  if constexpr (kSmem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(m_blocks * chunks), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(z));
  kernel<<<grid, Tr::kNThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace longattn::cuda::flash
