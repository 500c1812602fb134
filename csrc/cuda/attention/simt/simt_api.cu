// The SIMT backend's entry points (attention_launch.h): dtype -> element type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/attention/attention_launch.h"
#include "cuda/attention/simt/simt_launch.h"

namespace longattn::cuda {

cudaError_t simt_forward(const AttentionParams& p, KernelDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case KernelDtype::kFloat32: return simt::launch_simt_forward<float>(p, stream);
    case KernelDtype::kFloat64: return simt::launch_simt_forward<double>(p, stream);
    case KernelDtype::kFloat16: return simt::launch_simt_forward<__half>(p, stream);
    case KernelDtype::kBFloat16: return simt::launch_simt_forward<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

// Always deterministic: the SIMT backward uses no atomics.
size_t simt_backward_workspace(const AttentionParams& p, KernelDtype dtype,
                               bool /*deterministic*/) {
  return simt::simt_workspace_bytes(p, dtype == KernelDtype::kFloat64 ? sizeof(double)
                                                                      : sizeof(float));
}

cudaError_t simt_backward(const AttentionParams& p, const AttentionGrads& g, KernelDtype dtype,
                          cudaStream_t stream) {
  switch (dtype) {
    case KernelDtype::kFloat32: return simt::launch_simt_backward<float>(p, g, stream);
    case KernelDtype::kFloat64: return simt::launch_simt_backward<double>(p, g, stream);
    case KernelDtype::kFloat16: return simt::launch_simt_backward<__half>(p, g, stream);
    case KernelDtype::kBFloat16: return simt::launch_simt_backward<__nv_bfloat16>(p, g, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace longattn::cuda
