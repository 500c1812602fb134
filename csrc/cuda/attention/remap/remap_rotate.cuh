// Rotations of shared-memory tiles in the SIMT rope_attention kernels: a query or key tile is
// loaded as it is stored (before RoPE) and rotated in place on one side (common/remap.h), each
// (row, pair) item computing its exact angle's sin and cos (common/rope_math.h) as it goes; a
// gradient tile is rotated back the same way with the opposite angle.
#pragma once
#include "common/remap.h"
#include "cuda/attention/remap/remap_tiles.h"
#include "cuda/attention/simt/simt_common.cuh"

namespace longattn::cuda::remap {

// Rows [0, rows) of tile (row stride ld) rotated in place, row r by spec(r) (a RotSpec), or
// by its opposite angle when inverse (the transpose of the scaled rotation: the gradient's
// way back). One thread owns a pair's two features, so in place is safe; features past
// rotary_dim are left as they are. CTA-wide; the caller synchronizes.
template <typename A, typename Spec>
__device__ __forceinline__ void rotate_tile(A* tile, int ld, int rows, const RotaryParams& rot,
                                            Spec&& spec, bool inverse) {
  const int half = static_cast<int>(rot.rotary_dim / 2);
  for (int idx = threadIdx.x; idx < rows * half; idx += kThreads) {
    const int r = idx / half, i = idx % half;
    A s, c;
    rot_sincos<A>(spec(r), rot, i, &s, &c);
    if (inverse) s = -s;
    A* x = tile + r * ld;
    const int64_t a = rot.pair_a(i), b = rot.pair_b(i);
    const A x0 = x[a], x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x1 * c + x0 * s;
  }
}

// dst = src on rows x cols (both row stride ld). CTA-wide; the caller synchronizes.
template <typename A>
__device__ __forceinline__ void copy_tile(A* dst, const A* src, int ld, int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, c = idx % cols;
    dst[r * ld + c] = src[r * ld + c];
  }
}

// dst += src on rows x cols (both row stride ld). CTA-wide; the caller synchronizes.
template <typename A>
__device__ __forceinline__ void add_tile(A* dst, const A* src, int ld, int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, c = idx % cols;
    dst[r * ld + c] += src[r * ld + c];
  }
}

}  // namespace longattn::cuda::remap
