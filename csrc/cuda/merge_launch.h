// The CUDA merge kernels' entry points (merge_attention, its backward, and merge_attention_,
// the running form in place): plain pointers in, no torch types, so merge_kernel.cu compiles
// without ATen headers. The row math is common/merge.h, shared with the CPU kernel.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/kernel_dtype.h"

namespace longattn::cuda {

// Partials per call the kernels take; their pointers travel in the launch parameters.
constexpr int kMaxMergePartials = 16;

// outs[i]: contiguous [outer, L, H, D]; lses[i]: contiguous [outer, H, L] (fp32, or fp64 with
// fp64 outs, the accumulation type). out/lse likewise.
struct MergeParams {
  int n = 0;
  const void* outs[kMaxMergePartials] = {};
  const void* lses[kMaxMergePartials] = {};
  int64_t outer = 0, L = 0, H = 0, D = 0;
  void* out = nullptr;
  void* lse = nullptr;
  // Backward only: dout like out, dlse like lse (or null), merged lse; grads like the inputs.
  const void* dout = nullptr;
  const void* dlse = nullptr;
  void* douts[kMaxMergePartials] = {};
  void* dlses[kMaxMergePartials] = {};
};

// merge_attention_: part_out contiguous [outer, n, H, D] in the launch's dtype, part_lse
// contiguous [outer, H, n] in its accumulation type; they join rows [row_start, row_start + n)
// of out [outer, L, H, D] and lse [outer, H, L] (accumulation type, contiguous) in place.
struct MergeIntoParams {
  const void* part_out = nullptr;
  const void* part_lse = nullptr;
  void* out = nullptr;
  void* lse = nullptr;
  int64_t outer = 0, L = 0, n = 0, H = 0, D = 0, row_start = 0;
};

cudaError_t launch_merge_forward(const MergeParams& p, KernelDtype dtype, cudaStream_t stream);
cudaError_t launch_merge_backward(const MergeParams& p, KernelDtype dtype, cudaStream_t stream);
cudaError_t launch_merge_into(const MergeIntoParams& p, KernelDtype dtype, cudaStream_t stream);

}  // namespace longattn::cuda
