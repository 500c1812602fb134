// The decode kernels behind launch_decode (kvcache_launch.h), one translation unit each:
//
// - decode_tile_kernel.cu: the bandwidth kernel (bf16/fp16/fp32 caches whose key rows are 8, 16
//   or 32 aligned 16-byte vectors, D == Dv): K/V tiles streamed through shared memory with
//   cp.async, every query row of the GQA group served from each tile;
// - decode_chunk_kernel.cu: every other cache (fp64, odd head dims, unaligned rows, Dv != D), in
//   fixed chunks of kv::kDecodeChunk keys;
// - decode_combine_kernel.cu: the merge of a row's partials in split order and the fused score
//   accumulation, for both.
// decode_launch.cu picks the kernel and sizes the split; the partials' layout is DecodeParams'.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/kernel_dtype.h"
#include "cuda/kvcache/kvcache_launch.h"

namespace longattn::cuda {

// The tile kernel's geometry for one problem on one device.
struct TilePlan {
  DecodeSplit split;
  int64_t rows_per_cta = 0;  // query rows of a GQA group per CTA; 0: the kernel does not apply
  int64_t row_blocks = 1;    // CTAs per (split, kv head) along those rows
  int lanes = 0;             // threads per key row: its 16-byte vectors
  size_t smem = 0;           // dynamic shared memory per CTA
};

// The device facts the plans depend on (results depend on them only through the split).
struct DecodeDevice {
  int sms = 1;
  int smem_optin = 48 * 1024;
};

TilePlan plan_decode_tiles(const DecodeParams& p, KernelDtype dtype, const DecodeDevice& dev);
cudaError_t launch_decode_tiles(const DecodeParams& p, const TilePlan& tp, KernelDtype dtype,
                                cudaStream_t stream);

// The generic kernel's split: fixed chunks of kv::kDecodeChunk keys.
DecodeSplit chunk_split(const DecodeParams& p);
cudaError_t launch_decode_chunks(const DecodeParams& p, KernelDtype dtype, cudaStream_t stream);

// The merge into out/lse (and, with scores, their update) after either kernel.
cudaError_t launch_decode_finish(const DecodeParams& p, const DecodeSplit& split,
                                 KernelDtype dtype, cudaStream_t stream);

}  // namespace longattn::cuda
