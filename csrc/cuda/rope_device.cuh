// Pieces shared by the CUDA RoPE kernels (rope_kernel.cu: the rotation; rope_backward_kernel.cu:
// the backward with the inv_freq gradient): a token's cos/sin table, the rotation of one unit of
// pairs, the copy of the features past rotary_dim, and the host-side choice of the row access
// (16-byte vectors when aligned).
// Only common/ headers and the CUDA toolkit's: no ATen here.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/rope_math.h"
#include "common/rope_params.h"
#include "cuda/device_common.cuh"

namespace longattn::cuda::rope_device {

// cos/sin (times the scaling; sin negated for the inverse) of the token at `pos`, one frequency
// per thread of the token (threadIdx.x), with the exact angle reduction of common/rope_math.h.
template <typename C>
__device__ __forceinline__ void fill_table(const RopeParams& p, int64_t pos, C* cos_t, C* sin_t) {
  const C cos_mul = static_cast<C>(p.scaling);
  const C sin_mul = static_cast<C>(p.inverse ? -p.scaling : p.scaling);
  for (int64_t i = threadIdx.x; i < p.rotary_dim / 2; i += blockDim.x) {
    C s, c;
    rope::rope_sincos<C>(pos, p.frequency(i), &s, &c);
    cos_t[i] = c * cos_mul;
    sin_t[i] = s * sin_mul;
  }
}

// One unit of a head's row: N pairs, i in [i0, i0 + N). NeoX: pair i is features (i, half + i),
// two runs of N (lo, hi); interleaved: (2i, 2i + 1), one run of 2N (lo; hi unused). Each run is
// moved with one access (16 bytes when Vec).
template <typename T, int N, bool Vec, bool Interleaved>
struct RopeUnit {
  Elems<T, Interleaved ? 2 * N : N, Vec> lo;
  Elems<T, N, Vec> hi;

  __device__ __forceinline__ void load(const T* row, int64_t half, int64_t i0) {
    if constexpr (Interleaved) {
      lo.load(row + 2 * i0);
    } else {
      lo.load(row + i0);
      hi.load(row + half + i0);
    }
  }
  __device__ __forceinline__ void store(T* row, int64_t half, int64_t i0) const {
    if constexpr (Interleaved) {
      lo.store(row + 2 * i0);
    } else {
      lo.store(row + i0);
      hi.store(row + half + i0);
    }
  }
  // The two elements of pair i0 + j.
  __device__ __forceinline__ T& first(int j) { return lo.v[Interleaved ? 2 * j : j]; }
  __device__ __forceinline__ T& second(int j) {
    if constexpr (Interleaved) {
      return lo.v[2 * j + 1];
    } else {
      return hi.v[j];
    }
  }
};

// Rotates the pairs of a unit in place by the table's entries i0 .. i0 + N - 1, in the compute
// type C; on_pair(j, y0, y1) sees each rotated pair before it is rounded to T (the backward
// accumulates the inv_freq gradient there).
template <typename C, typename T, int N, bool Vec, bool Interleaved, typename OnPair>
__device__ __forceinline__ void rotate_unit(RopeUnit<T, N, Vec, Interleaved>& u, int64_t i0,
                                            const C* cos_t, const C* sin_t, OnPair&& on_pair) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    C y0, y1;
    rope::rotate_pair(to_acc(u.first(j)), to_acc(u.second(j)), cos_t[i0 + j], sin_t[i0 + j], &y0,
                      &y1);
    on_pair(j, y0, y1);
    u.first(j) = from_acc<T>(y0);
    u.second(j) = from_acc<T>(y1);
  }
}

template <typename C, typename T, int N, bool Vec, bool Interleaved>
__device__ __forceinline__ void rotate_unit(RopeUnit<T, N, Vec, Interleaved>& u, int64_t i0,
                                            const C* cos_t, const C* sin_t) {
  rotate_unit(u, i0, cos_t, sin_t, [](int, C, C) {});
}

// Out of place: features past rotary_dim of every head of one token, in -> out, by the threads
// of the token; 16-byte chunks when tail_vec (see tail_vectorizable).
template <typename T>
__device__ __forceinline__ void copy_tail(const RopeParams& p, const RopeTensor& v, const T* in_tok,
                                          T* out_tok, bool tail_vec) {
  constexpr int kTailN = 16 / sizeof(T);
  const int64_t tail = v.head_dim - p.rotary_dim;
  if (!p.copy_tail || tail <= 0) return;
  if (tail_vec) {
    const int64_t per_row = tail / kTailN;
    for (int64_t w = threadIdx.x; w < v.heads * per_row; w += blockDim.x) {
      const int64_t h = w / per_row, off = p.rotary_dim + (w % per_row) * kTailN;
      Elems<T, kTailN, true> a;
      a.load(in_tok + h * v.in_stride_h + off);
      a.store(out_tok + h * v.out_stride_h + off);
    }
  } else {
    for (int64_t w = threadIdx.x; w < v.heads * tail; w += blockDim.x) {
      const int64_t h = w / tail, off = p.rotary_dim + w % tail;
      out_tok[h * v.out_stride_h + off] = in_tok[h * v.in_stride_h + off];
    }
  }
}

// True when every row of q and k (inputs, outputs, and the saved forward inputs of the
// backward) starts on a 16-byte boundary at element offset `elem_off`, and so does every chunk
// of 16 / sizeof(T) elements from there.
template <typename T>
bool rows_aligned(const RopeParams& p, int64_t elem_off) {
  // A stride matters only along a dim of size > 1.
  auto ok = [](int64_t stride, int64_t size) {
    return size <= 1 || (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  };
  auto ptr_ok = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if ((elem_off * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  for (int x = 0; x < p.n_tensors; ++x) {
    const RopeTensor& v = p.x[x];
    if (!ptr_ok(v.in) || !ptr_ok(v.out) || !ptr_ok(v.saved)) return false;
    if (!ok(v.in_stride_b, p.batch) || !ok(v.in_stride_l, p.seqlen) || !ok(v.in_stride_h, v.heads) ||
        !ok(v.out_stride_b, p.batch) || !ok(v.out_stride_l, p.seqlen) || !ok(v.out_stride_h, v.heads) ||
        !ok(v.saved_stride_b, p.batch) || !ok(v.saved_stride_l, p.seqlen) ||
        !ok(v.saved_stride_h, v.heads)) {
      return false;
    }
  }
  return true;
}

// The tails past rotary_dim can be copied in 16-byte chunks.
template <typename T>
bool tail_vectorizable(const RopeParams& p) {
  bool vec = rows_aligned<T>(p, p.rotary_dim);
  for (int x = 0; x < p.n_tensors; ++x) {
    vec = vec && (p.x[x].head_dim - p.rotary_dim) % (16 / sizeof(T)) == 0;
  }
  return vec;
}

// Threads per token: enough for its `units`, a warp at least, 256 at most (a power of two).
inline int threads_per_token(int64_t units) {
  int tpt = 32;
  while (tpt < 256 && tpt < units) tpt *= 2;
  return tpt;
}

inline int64_t total_heads(const RopeParams& p) {
  return p.x[0].heads + (p.n_tensors == 2 ? p.x[1].heads : 0);
}

// Calls f(std::integral_constant<int, N>, bool_constant<Vec>, bool_constant<Interleaved>) with
// the row access the tensors allow: a unit of N pairs moved with one 16-byte access per run
// (NeoX: N pairs (i, i + half) as two runs; interleaved: 2N contiguous elements) when every row
// is aligned, else one pair at a time.
template <typename T, typename F>
cudaError_t with_row_access(const RopeParams& p, F&& f) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access
  const int64_t half = p.rotary_dim / 2;
  if (p.interleaved) {
    constexpr int kPairs = kVec / 2;
    if (half % kPairs == 0 && rows_aligned<T>(p, 0)) {
      return f(std::integral_constant<int, kPairs>{}, std::true_type{}, std::true_type{});
    }
    return f(std::integral_constant<int, 1>{}, std::false_type{}, std::true_type{});
  }
  if (half % kVec == 0 && rows_aligned<T>(p, 0) && rows_aligned<T>(p, half)) {
    return f(std::integral_constant<int, kVec>{}, std::true_type{}, std::false_type{});
  }
  return f(std::integral_constant<int, 1>{}, std::false_type{}, std::false_type{});
}

}  // namespace longattn::cuda::rope_device
