// The SIMT rope_attention entry points (remap_launch.h): dtype -> element type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/attention/remap/remap_launch.h"
#include "cuda/attention/simt/simt_launch.h"

namespace longattn::cuda {

cudaError_t remap_forward(const RopeAttentionParams& p, KernelDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case KernelDtype::kFloat32: return remap::launch_forward<float>(p, stream);
    case KernelDtype::kFloat64: return remap::launch_forward<double>(p, stream);
    case KernelDtype::kFloat16: return remap::launch_forward<__half>(p, stream);
    case KernelDtype::kBFloat16: return remap::launch_forward<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

size_t remap_backward_workspace(const RopeAttentionParams& p, KernelDtype dtype) {
  return simt::simt_workspace_bytes(p.attn, dtype == KernelDtype::kFloat64 ? sizeof(double)
                                                                           : sizeof(float));
}

cudaError_t remap_backward(const RopeAttentionParams& p, const AttentionGrads& g, KernelDtype dtype,
                           cudaStream_t stream) {
  switch (dtype) {
    case KernelDtype::kFloat32: return remap::launch_backward<float>(p, g, stream);
    case KernelDtype::kFloat64: return remap::launch_backward<double>(p, g, stream);
    case KernelDtype::kFloat16: return remap::launch_backward<__half>(p, g, stream);
    case KernelDtype::kBFloat16: return remap::launch_backward<__nv_bfloat16>(p, g, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace longattn::cuda
