// flash_backward / flash_backward_workspace / flash_backward_smem (attention_launch.h): pick the
// instantiated configuration for the dtype, head dim and the device's shared memory.
#include <algorithm>

#include "cuda/attention/attention_launch.h"
#include "cuda/attention/flash/bwd_api.h"
#include "cuda/attention/flash/bwd_params.h"

namespace longattn::cuda {
namespace {

template <class Kt>
constexpr int smem_of() {
  return std::max(Kt::kSmemDkdv, Kt::kSmemDq);
}

// The configurations of a head dim, widest tiles first (fp16 and bf16 tiles have the same size).
enum class BwdConfigId { kNone, kHd64, kHd96, kHd128, kHd128Narrow, kHd256 };

BwdConfigId pick_config(int64_t head_dim, int max_smem_optin) {
  using namespace flash;
  using H = cutlass::half_t;
  const auto fits = [&](int smem) { return smem <= max_smem_optin; };
  switch (head_dim) {
    case 64:
      return fits(smem_of<DeviceBwdTraits<H, 64>>()) ? BwdConfigId::kHd64 : BwdConfigId::kNone;
    case 96:
      return fits(smem_of<DeviceBwdTraits<H, 96>>()) ? BwdConfigId::kHd96 : BwdConfigId::kNone;
    case 128:
      if (fits(smem_of<DeviceBwdTraits<H, 128>>())) return BwdConfigId::kHd128;
      return fits(smem_of<DeviceBwdTraits<H, 128, true>>()) ? BwdConfigId::kHd128Narrow : BwdConfigId::kNone;
    case 256:
      return fits(smem_of<DeviceBwdTraits<H, 256>>()) ? BwdConfigId::kHd256 : BwdConfigId::kNone;
    default:
      return BwdConfigId::kNone;
  }
}

int config_smem(BwdConfigId c) {
  using namespace flash;
  using H = cutlass::half_t;
  switch (c) {
    case BwdConfigId::kHd64: return smem_of<DeviceBwdTraits<H, 64>>();
    case BwdConfigId::kHd96: return smem_of<DeviceBwdTraits<H, 96>>();
    case BwdConfigId::kHd128: return smem_of<DeviceBwdTraits<H, 128>>();
    case BwdConfigId::kHd128Narrow: return smem_of<DeviceBwdTraits<H, 128, true>>();
    case BwdConfigId::kHd256: return smem_of<DeviceBwdTraits<H, 256>>();
    default: return 0;
  }
}

template <typename Elem>
cudaError_t run_for_dtype(const AttentionParams& p, const AttentionGrads& g, cudaStream_t stream) {
  using namespace flash;
  int dev = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  switch (pick_config(p.head_dim, max_smem)) {
    case BwdConfigId::kHd64: return run_flash_bwd<DeviceBwdTraits<Elem, 64>>(p, g, stream);
    case BwdConfigId::kHd96: return run_flash_bwd<DeviceBwdTraits<Elem, 96>>(p, g, stream);
    case BwdConfigId::kHd128: return run_flash_bwd<DeviceBwdTraits<Elem, 128>>(p, g, stream);
    case BwdConfigId::kHd128Narrow: return run_flash_bwd<DeviceBwdTraits<Elem, 128, true>>(p, g, stream);
    case BwdConfigId::kHd256: return run_flash_bwd<DeviceBwdTraits<Elem, 256>>(p, g, stream);
    default: return cudaErrorInvalidValue;  // the registration asks flash_backward_smem first
  }
}

}  // namespace

size_t flash_backward_smem(int64_t head_dim, int max_smem_optin) {
  return static_cast<size_t>(config_smem(pick_config(head_dim, max_smem_optin)));
}

size_t flash_backward_workspace(const AttentionParams& p, KernelDtype, bool deterministic) {
  return flash::bwd_workspace(p, deterministic).total;
}

cudaError_t flash_backward(const AttentionParams& p, const AttentionGrads& g, KernelDtype dtype,
                           cudaStream_t stream) {
  switch (dtype) {
    case KernelDtype::kFloat16:
      return run_for_dtype<cutlass::half_t>(p, g, stream);
    case KernelDtype::kBFloat16:
      return run_for_dtype<cutlass::bfloat16_t>(p, g, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace longattn::cuda
