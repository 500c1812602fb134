// The CUDA attention kernels' entry points: AttentionParams (common/attention_params.h, the
// struct the CPU kernels take) plus plain device pointers, no torch types, so no kernel
// translation unit includes ATen. attention_register.cpp checks the tensors, allocates the
// outputs and the zeroed workspace, and picks a backend:
//   flash: tensor-core kernels (mma.sync, SM80+), fp16/bf16, head dims in kFlashHeadDims;
//   simt:  CUDA-core kernels for every dtype (fp32/fp64 too) and every head dim <= 256;
//   sm90:  the Hopper forward (wgmma + TMA, sm_90a only, sm90/), built when the CUDA
//          architectures name a 9.x arch (LONGATTN_WITH_SM90); what it covers: sm90/support.h.
// All follow docs/semantics.md as the CPU kernels do (sm90 with the exceptions docs/cuda.md
// lists): the mask, tile ranges and tile classification come from common/mask.h, logits from
// common/scores.h.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/attention_params.h"
#include "cuda/kernel_dtype.h"

namespace longattn::cuda {

// Head dims the tensor-core kernels are instantiated for (forward and backward; the backward
// also needs the device's shared memory, see flash_backward_smem).
constexpr int kFlashHeadDims[] = {64, 96, 128, 256};

inline bool flash_supported(KernelDtype dtype, int64_t head_dim) {
  if (dtype != KernelDtype::kFloat16 && dtype != KernelDtype::kBFloat16) return false;
  for (int d : kFlashHeadDims) {
    if (d == head_dim) return true;
  }
  return false;
}

// Gradient-side buffers of one backward call (device pointers).
// dout: contiguous like out. dlse: lse's dtype and layout, or null (no lse gradient).
// dq: contiguous like q/out; dk, dv: contiguous with k's shape, (B, Lk, Hkv, D) or (Tk, Hkv, D),
// i.e. row stride heads_kv * head_dim. All three are written in full (no zeroing needed).
// dsink: [heads_q] in sink_logits' dtype (fp32, or fp64 when given with fp64 inputs), written
// in full, or null without sink logits.
// workspace: workspace_bytes of zeroed device memory, as asked by *_backward_workspace.
struct AttentionGrads {
  const void* dout = nullptr;
  const void* dlse = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dsink = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // torch.use_deterministic_algorithms(True): results must not depend on the order of atomic
  // updates (bit-identical across runs on one GPU).
  bool deterministic = false;
};

// Forward: p.out (contiguous, q's dtype) and p.lse (fp32; fp64 for fp64 inputs) are written.
// cu_seqlens in p are device pointers.
cudaError_t flash_forward(const AttentionParams& p, KernelDtype dtype, cudaStream_t stream);
cudaError_t simt_forward(const AttentionParams& p, KernelDtype dtype, cudaStream_t stream);
// Defined only in builds with LONGATTN_WITH_SM90; needs a compute capability 9.0 device.
cudaError_t sm90_forward(const AttentionParams& p, KernelDtype dtype, cudaStream_t stream);

// Backward: p.out and p.lse point at the forward's results. Zeroed scratch needed, in bytes.
size_t flash_backward_workspace(const AttentionParams& p, KernelDtype dtype, bool deterministic);
size_t simt_backward_workspace(const AttentionParams& p, KernelDtype dtype, bool deterministic);
// Shared memory per block of the flash backward configuration that runs at this head dim on a
// device whose blocks may opt in to max_smem_optin bytes; 0 when none fits (hd 96 needs 116 KB,
// hd 256 176 KB; hd 128 has narrow tiles for 99 KB parts): the SIMT backward then runs.
size_t flash_backward_smem(int64_t head_dim, int max_smem_optin);
cudaError_t flash_backward(const AttentionParams& p, const AttentionGrads& g, KernelDtype dtype,
                           cudaStream_t stream);
cudaError_t simt_backward(const AttentionParams& p, const AttentionGrads& g, KernelDtype dtype,
                          cudaStream_t stream);

}  // namespace longattn::cuda
