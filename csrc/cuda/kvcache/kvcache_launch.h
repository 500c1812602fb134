// The CUDA KV-cache kernels' entry points (decode_attention, compact_, compact_rerotate_):
// plain pointers and element strides in, no torch types, so the kernel translation units
// compile without ATen. kvcache_register.cpp checks the tensors (kvcache_args.h), allocates
// outputs and scratch, and turns the validation kernel's findings into errors.
// The semantics are the CPU kernels' (csrc/cpu/kvcache.cpp, docs/semantics.md); the mask and
// keep-list rules come from common/kvcache_math.h, the rotation angles from common/rope_math.h.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/host_device.h"
#include "common/kv_slots.h"
#include "cuda/kernel_dtype.h"

namespace longattn::cuda {

// Per-head lengths (B, H): int32 or int64, element strides.
struct KvLengths {
  const void* data = nullptr;
  bool int64 = false;
  int64_t stride_b = 0, stride_h = 0;
};

// Largest head dim (of k and v) the decode kernels take: the generic kernel's query rows live
// in shared memory.
constexpr int64_t kMaxDecodeHeadDim = 1024;

// How decode splits a head's keys among CTAs (split-K over the cache, flash-decoding): spans of
// whole tiles, at least min_span keys, at most max_splits of them (the grid's x). The span is
// sized from the head's own length, read on the device, so a short head of a long-capacity cache
// still spreads over the grid. The kernels, the combine and the scores pass agree through this
// rule alone; a head's partials are merged in split order.
struct DecodeSplit {
  int64_t tile = 1, min_span = 1, max_splits = 1;
  LONGATTN_HD int64_t span(int64_t L) const {
    int64_t per = (L + max_splits - 1) / max_splits;
    per = (per + tile - 1) / tile * tile;
    return per > min_span ? per : min_span;
  }
  LONGATTN_HD int64_t count(int64_t L) const { return L > 0 ? (L + span(L) - 1) / span(L) : 0; }
};

// decode_attention over a contiguous or paged cache (common/kv_slots.h). Rows r = g * n + i of
// kv head h are q head h * G + g, new token i; every (b, h, r) row is row (b * Hkv + h) * G * n + r
// of out/lse, as in (B, Hq, n). Accumulation type A: fp32, fp64 for fp64 caches.
struct DecodeParams {
  int64_t B = 0, Hq = 0, Hkv = 0, G = 0, n = 0, D = 0, Dv = 0;
  int64_t C = 0;  // slots per (b, h): the capacity (paged: table width * block size)
  double scale = 1.0;
  int64_t window = -1, sinks = 0;
  const void* q = nullptr;  // contiguous (B, Hq, n, D)
  const void* k = nullptr;  // slot j of (b, h) at k + ks.offset(slots.locate(b, h, j), h)
  const void* v = nullptr;
  kv::SlotMap slots;
  kv::SlotStrides ks, vs;
  KvLengths lengths;
  const int64_t* positions = nullptr;  // per slot, or null (the slot index)
  kv::SlotStrides ps;
  const int64_t* q_positions = nullptr;  // (B, n) or null (every cached key visible)
  int64_t qps[2] = {0, 0};
  float* scores = nullptr;  // per slot fp32, accumulated into; or null
  kv::SlotStrides ss;
  void* out = nullptr;  // contiguous (B, Hq, n, Dv), q's dtype
  void* lse = nullptr;  // contiguous (B, Hq, n), A
  // Scratch of A, written before read (no zeroing), sized by decode_scratch:
  void* part_out = nullptr;  // (B, Hkv, splits, G * n, Dv)
  void* part_lse = nullptr;  // (B, Hkv, splits, G * n)
  void* logits = nullptr;    // (B, Hkv, G * n, C); only with scores
};

// Elements of A each scratch buffer needs: the split count depends on the problem and on the
// device (its SM count and shared memory), never on the lengths' values.
struct DecodeScratch {
  int64_t part_out = 0, part_lse = 0, logits = 0;
};
DecodeScratch decode_scratch(const DecodeParams& p, KernelDtype dtype);

// A (b, h) whose length lies outside [0, C], or (paged) whose block table names a block outside
// the pool among its first length slots, gets NaN out and lse rows and no score update (nothing
// is read back to the host: no synchronization per decode step).
cudaError_t launch_decode(const DecodeParams& p, KernelDtype dtype, cudaStream_t stream);

// compact_, compact_rerotate_ (new_positions != null) and compact_paged_ (slots.paged()): the
// per-slot tensors reached through slots (common/kv_slots.h), the table read as it was before
// the call.
struct CompactParams {
  int64_t B = 0, H = 0, C = 0, K = 0;
  void* k = nullptr;  // head dim contiguous
  void* v = nullptr;
  int64_t D = 0, Dv = 0;
  kv::SlotMap slots;
  kv::SlotStrides ks, vs;
  int64_t* positions = nullptr;  // or null (compact_ only)
  kv::SlotStrides ps;
  float* scores = nullptr;  // or null
  kv::SlotStrides ss;
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
  // Paged: the new block table (B, H, max_blocks), contiguous, for the host to copy in once the
  // status is clean (-1 past each head's kept blocks).
  int32_t* new_table = nullptr;
  // int32 scratch of compact_scratch_size elements (the launch zeroes what needs it).
  int32_t* scratch = nullptr;
};

// Elements of CompactParams::scratch; its head, B * H values per head, is the status:
int64_t compact_scratch_size(const CompactParams& p, KernelDtype dtype);

// status[b * H + h] (scratch[0 .. B * H)) after launch_compact: kKeepOk, kBadLength (lengths
// outside [0, C]), kBadKeepLength (keep_lengths outside [0, K]), or the first bad entry j >= 0 of
// keep[b, h] (not strictly ascending, or outside [0, length)). Paged, block_status[b * H + h]
// (scratch[B * H .. 2 * B * H)): kKeepOk, or 2 * i + kind for the first table entry i of the
// head's cached slots that names no block of the pool (kind 0) or a block an earlier entry in
// (b, h, i) order names too (kind 1). When any is bad nothing moves.
constexpr int32_t kKeepOk = -1;
constexpr int32_t kBadLength = -2;
constexpr int32_t kBadKeepLength = -3;

// Validation (and, paged, the remap plan), then the in-place moves (skipped on the device when
// anything is bad).
cudaError_t launch_compact(const CompactParams& p, KernelDtype dtype, cudaStream_t stream);

}  // namespace longattn::cuda
