// flash_backward / flash_backward_workspace / flash_backward_smem (attention_launch.h): pick the
// instantiated configuration for the dtype, head dim and the device's shared memory.
#include <algorithm>

#include "cuda/attention/attention_launch.h"
#include "cuda/attention/flash/bwd_api.h"
#include "cuda/attention/flash/bwd_params.h"
#include "cuda/attention/flash/instances.h"

namespace longattn::cuda {
namespace {

template <class Kt>
constexpr int smem_of() {
  return std::max(Kt::kSmemDkdv, Kt::kSmemDq);
}

enum class BwdConfigId { kNone, kHd64, kHd96, kHd128, kHd128Narrow, kHd256 };

struct BwdConfigInfo {
  BwdConfigId id;
  int64_t head_dim;
  int smem;  // per block, the larger of the dK/dV and dQ kernels'
};

// Every instantiated configuration, widest tiles first within a head dim (fp16 and bf16 tiles
// have the same size, so half_t stands for both).
constexpr BwdConfigInfo kBwdConfigs[] = {
    {BwdConfigId::kHd64, 64, smem_of<flash::DeviceBwdTraits<cutlass::half_t, 64>>()},
    {BwdConfigId::kHd96, 96, smem_of<flash::DeviceBwdTraits<cutlass::half_t, 96>>()},
    {BwdConfigId::kHd128, 128, smem_of<flash::DeviceBwdTraits<cutlass::half_t, 128>>()},
    {BwdConfigId::kHd128Narrow, 128, smem_of<flash::DeviceBwdTraits<cutlass::half_t, 128, true>>()},
    {BwdConfigId::kHd256, 256, smem_of<flash::DeviceBwdTraits<cutlass::half_t, 256>>()},
};

// The widest configuration of the head dim that fits max_smem_optin bytes per block.
BwdConfigInfo pick_config(int64_t head_dim, int max_smem_optin) {
  for (const BwdConfigInfo& c : kBwdConfigs) {
    if (c.head_dim == head_dim && c.smem <= max_smem_optin) return c;
  }
  return {BwdConfigId::kNone, head_dim, 0};
}

template <flash::FlashDtype kDtype>
cudaError_t run_for_dtype(const AttentionParams& p, const AttentionGrads& g, cudaStream_t stream) {
  using flash::flash_bwd;
  int dev = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  switch (pick_config(p.head_dim, max_smem).id) {
    case BwdConfigId::kHd64: return flash_bwd<kDtype, 64, false>(p, g, stream);
    case BwdConfigId::kHd96: return flash_bwd<kDtype, 96, false>(p, g, stream);
    case BwdConfigId::kHd128: return flash_bwd<kDtype, 128, false>(p, g, stream);
    case BwdConfigId::kHd128Narrow: return flash_bwd<kDtype, 128, true>(p, g, stream);
    case BwdConfigId::kHd256: return flash_bwd<kDtype, 256, false>(p, g, stream);
    default: return cudaErrorInvalidValue;  // the registration asks flash_backward_smem first
  }
}

}  // namespace

size_t flash_backward_smem(int64_t head_dim, int max_smem_optin) {
  return static_cast<size_t>(pick_config(head_dim, max_smem_optin).smem);
}

size_t flash_backward_workspace(const AttentionParams& p, KernelDtype, bool deterministic) {
  return flash::bwd_workspace(p, deterministic).total;
}

cudaError_t flash_backward(const AttentionParams& p, const AttentionGrads& g, KernelDtype dtype,
                           cudaStream_t stream) {
  switch (dtype) {
    case KernelDtype::kFloat16:
      return run_for_dtype<flash::FlashDtype::kFp16>(p, g, stream);
    case KernelDtype::kBFloat16:
      return run_for_dtype<flash::FlashDtype::kBf16>(p, g, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace longattn::cuda
