// The CUDA KV-cache kernels' entry points (decode_attention, compact_, compact_rerotate_):
// plain pointers and element strides in, no torch types, so the kernel translation units
// compile without ATen. kvcache_register.cpp checks the tensors (kvcache_args.h), allocates
// outputs and scratch, and turns the validation kernel's findings into errors.
// The semantics are the CPU kernels' (csrc/cpu/kvcache.cpp, docs/semantics.md); the mask and
// keep-list rules come from common/kvcache_math.h, the rotation angles from common/rope_math.h.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/kernel_dtype.h"

namespace longattn::cuda {

// Per-head lengths (B, H): int32 or int64, element strides.
struct KvLengths {
  const void* data = nullptr;
  bool int64 = false;
  int64_t stride_b = 0, stride_h = 0;
};

// Largest head dim (of k and v) the decode kernel takes: its query rows live in shared memory.
constexpr int64_t kMaxDecodeHeadDim = 1024;

// decode_attention. Rows r = g * n + i of kv head h are q head h * G + g, new token i; every
// (b, h, r) row is row (b * Hkv + h) * G * n + r of out/lse, as in (B, Hq, n).
// Accumulation type A: fp32, fp64 for fp64 caches.
struct DecodeParams {
  int64_t B = 0, Hq = 0, Hkv = 0, G = 0, n = 0, D = 0, Dv = 0, C = 0;
  double scale = 1.0;
  int64_t window = -1, sinks = 0;
  const void* q = nullptr;  // contiguous (B, Hq, n, D)
  const void* k = nullptr;  // (B, Hkv, C, D), strides of b, h, slot; head dim contiguous
  const void* v = nullptr;
  int64_t ks[3] = {0, 0, 0}, vs[3] = {0, 0, 0};
  KvLengths lengths;
  const int64_t* positions = nullptr;  // (B, Hkv, C) or null (slot index)
  int64_t ps[3] = {0, 0, 0};
  const int64_t* q_positions = nullptr;  // (B, n) or null (every cached key visible)
  int64_t qps[2] = {0, 0};
  float* scores = nullptr;  // (B, Hkv, C) fp32, accumulated into; or null
  int64_t ss[3] = {0, 0, 0};
  void* out = nullptr;  // contiguous (B, Hq, n, Dv), q's dtype
  void* lse = nullptr;  // contiguous (B, Hq, n), A
  // Scratch of A, written before read (no zeroing): chunks = ceil(C / kv::kDecodeChunk).
  void* part_out = nullptr;  // (B, Hkv, chunks, G * n, Dv)
  void* part_lse = nullptr;  // (B, Hkv, chunks, G * n)
  void* logits = nullptr;    // (B, Hkv, chunks, G * n, kDecodeChunk); only with scores
};

// A (b, h) whose length lies outside [0, C] gets NaN out and lse rows and no score update
// (the lengths are not read back to the host: no synchronization per decode step).
cudaError_t launch_decode(const DecodeParams& p, KernelDtype dtype, cudaStream_t stream);

// compact_ and compact_rerotate_ (new_positions != null).
struct CompactParams {
  int64_t B = 0, H = 0, C = 0, K = 0;
  void* k = nullptr;  // (B, H, C, D), strides of b, h, slot; head dim contiguous
  void* v = nullptr;
  int64_t D = 0, Dv = 0, ks[3] = {0, 0, 0}, vs[3] = {0, 0, 0};
  int64_t* positions = nullptr;  // (B, H, C) or null (compact_ only)
  int64_t ps[3] = {0, 0, 0};
  float* scores = nullptr;  // (B, H, C) or null
  int64_t ss[3] = {0, 0, 0};
  const int64_t* keep = nullptr;          // contiguous (B, H, K)
  const int64_t* keep_lengths = nullptr;  // contiguous (B * H)
  KvLengths lengths;                      // read only: the host writes the new lengths
  // compact_rerotate_: key keep[j] is rotated by new_positions[j] - positions[keep[j]].
  const int64_t* new_positions = nullptr;  // (B, H, K), element strides ns
  int64_t ns[3] = {0, 0, 0};
  const void* inv_freq = nullptr;  // rotary_dim / 2 values
  bool inv_freq_fp64 = false;
  int64_t rotary_dim = 0;
  bool interleaved = false;
  // Scratch: status (B * H) int32, see below; error_flag: one int32, zeroed by the launch;
  // shifts (B * H * K) int64, compact_rerotate_ only.
  int32_t* status = nullptr;
  int32_t* error_flag = nullptr;
  int64_t* shifts = nullptr;
};

// status[b * H + h] after launch_compact: kKeepOk, kBadLength (lengths outside [0, C]),
// kBadKeepLength (keep_lengths outside [0, K]), or the first bad entry j >= 0 of keep[b, h]
// (not strictly ascending, or outside [0, length)). When any (b, h) is bad nothing moves.
constexpr int32_t kKeepOk = -1;
constexpr int32_t kBadLength = -2;
constexpr int32_t kBadKeepLength = -3;

// Validation kernel, then the in-place moves (skipped on device when the flag is set).
cudaError_t launch_compact(const CompactParams& p, KernelDtype dtype, cudaStream_t stream);

}  // namespace longattn::cuda
