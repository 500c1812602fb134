// launch_decode and decode_scratch (kvcache_launch.h): the choice between the tile kernel and the
// generic chunk kernel (decode_kernels.h), the split they use, then the combine.
//
// The split depends on the problem and on the device (its SM count sizes the grid, its shared
// memory the rows per CTA), never on the lengths' values: the scratch is allocated without
// reading them back, and the results are the same on every run on one device.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kvcache/decode_kernels.h"

namespace longattn::cuda {
namespace {

struct DecodePlan {
  bool tiles = false;
  TilePlan tile;
  DecodeSplit split;
};

DecodeDevice current_device() {
  DecodeDevice d;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return d;
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess) d.sms = v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess) {
    d.smem_optin = v;
  }
  return d;
}

DecodePlan plan(const DecodeParams& p, KernelDtype dtype) {
  DecodePlan pl;
  if (p.C > 0) pl.tile = plan_decode_tiles(p, dtype, current_device());
  pl.tiles = pl.tile.rows_per_cta > 0;
  pl.split = pl.tiles ? pl.tile.split : chunk_split(p);
  return pl;
}

}  // namespace

DecodeScratch decode_scratch(const DecodeParams& p, KernelDtype dtype) {
  const DecodePlan pl = plan(p, dtype);
  const int64_t R = p.G * p.n, heads = p.B * p.Hkv;
  DecodeScratch s;
  s.part_lse = heads * pl.split.max_splits * R;
  s.part_out = s.part_lse * p.Dv;
  s.logits = p.scores != nullptr ? heads * R * p.C : 0;
  return s;
}

cudaError_t launch_decode(const DecodeParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (p.B * p.Hkv * p.G * p.n == 0) return cudaSuccess;
  const DecodePlan pl = plan(p, dtype);
  const cudaError_t e = pl.tiles ? launch_decode_tiles(p, pl.tile, dtype, stream)
                                 : launch_decode_chunks(p, dtype, stream);
  if (e != cudaSuccess) return e;
  return launch_decode_finish(p, pl.split, dtype, stream);
}

}  // namespace longattn::cuda
