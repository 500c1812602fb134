// flash_backward / flash_backward_workspace (attention_launch.h): pick the instantiated
// configuration for the dtype, head dim and the device's shared memory.
#include <algorithm>

#include "cuda/attention/attention_launch.h"
#include "cuda/attention/flash/bwd_api.h"
#include "cuda/attention/flash/bwd_params.h"

namespace longattn::cuda {
namespace {

template <typename Elem>
cudaError_t run_for_dtype(const AttentionParams& p, const AttentionGrads& g, cudaStream_t stream) {
  using namespace flash;
  if (p.head_dim == 64) return run_flash_bwd<DeviceBwdTraits<Elem, 64>>(p, g, stream);
  if (p.head_dim != 128) return cudaErrorInvalidValue;
  int dev = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  using Wide = DeviceBwdTraits<Elem, 128>;
  if (std::max(Wide::kSmemDkdv, Wide::kSmemDq) <= max_smem) return run_flash_bwd<Wide>(p, g, stream);
  return run_flash_bwd<DeviceBwdTraits<Elem, 128, true>>(p, g, stream);
}

}  // namespace

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
