// CUDA RoPE kernel. A thread block holds one or more tokens (threadIdx.y); the threads of a
// token first build its cos/sin table in shared memory with the same exact angle reduction as
// the CPU (common/rope_math.h, double arithmetic, one angle per thread), then stream every head
// of q and k through it. Each element is read once and written once, with 16-byte accesses
// when the rows are aligned (the usual case: contiguous bf16/fp16/fp32 heads); a scalar path
// covers odd strides and sizes. Only common/ headers and the CUDA toolkit's: no ATen here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/rope_math.h"
#include "common/rope_params.h"
#include "cuda/device_common.cuh"
#include "cuda/rope_launch.h"

namespace longattn::cuda {
namespace {

__device__ __forceinline__ int64_t position_at(const RopeParams& p, int64_t b, int64_t l) {
  const int64_t off = b * p.pos_stride_b + l * p.pos_stride_l;
  return p.positions_int64 ? static_cast<const int64_t*>(p.positions)[off]
                           : static_cast<const int32_t*>(p.positions)[off];
}

// NeoX: a unit is N pairs (i, i + half), i in [u*N, u*N + N). Interleaved: a unit is N pairs
// (2i, 2i + 1), i.e. 2N contiguous elements.
template <typename T, int N, bool Vec, bool Interleaved>
__global__ void __launch_bounds__(256) rope_kernel(const RopeParams p, bool tail_vec) {
  using C = acc_t<T>;
  constexpr int kElems = Interleaved ? 2 * N : N;
  constexpr int kTailN = 16 / sizeof(T);
  const int64_t half = p.rotary_dim / 2;
  C* cos_t = dynamic_smem<C>() + threadIdx.y * 2 * half;
  C* sin_t = cos_t + half;

  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = t < p.tokens();
  const int64_t b = active ? t / p.seqlen : 0, l = active ? t % p.seqlen : 0;
  if (active) {
    const int64_t pos = position_at(p, b, l);
    const C cos_mul = static_cast<C>(p.scaling);
    const C sin_mul = static_cast<C>(p.inverse ? -p.scaling : p.scaling);
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      const double f = p.inv_freq_fp64 ? static_cast<const double*>(p.inv_freq)[i]
                                       : static_cast<double>(static_cast<const float*>(p.inv_freq)[i]);
      C s, c;
      rope::rope_sincos<C>(pos, f, &s, &c);
      cos_t[i] = c * cos_mul;
      sin_t[i] = s * sin_mul;
    }
  }
  __syncthreads();
  if (!active) return;

  const int64_t units_per_row = half / N;
  for (int x = 0; x < p.n_tensors; ++x) {
    const RopeTensor& v = p.x[x];
    const T* in_tok = static_cast<const T*>(v.in) + b * v.in_stride_b + l * v.in_stride_l;
    T* out_tok = static_cast<T*>(v.out) + b * v.out_stride_b + l * v.out_stride_l;
    const int64_t units = v.heads * units_per_row;
    for (int64_t w = threadIdx.x; w < units; w += blockDim.x) {
      const int64_t h = w / units_per_row, u = w % units_per_row;
      const T* in = in_tok + h * v.in_stride_h;
      T* out = out_tok + h * v.out_stride_h;
      const int64_t i0 = u * N;
      if constexpr (Interleaved) {
        Elems<T, kElems, Vec> a;
        a.load(in + 2 * i0);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const C x0 = to_acc(a.v[2 * j]), x1 = to_acc(a.v[2 * j + 1]);
          const C c = cos_t[i0 + j], s = sin_t[i0 + j];
          a.v[2 * j] = from_acc<T>(x0 * c - x1 * s);
          a.v[2 * j + 1] = from_acc<T>(x1 * c + x0 * s);
        }
        a.store(out + 2 * i0);
      } else {
        Elems<T, kElems, Vec> a, bb;
        a.load(in + i0);
        bb.load(in + half + i0);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const C x0 = to_acc(a.v[j]), x1 = to_acc(bb.v[j]);
          const C c = cos_t[i0 + j], s = sin_t[i0 + j];
          a.v[j] = from_acc<T>(x0 * c - x1 * s);
          bb.v[j] = from_acc<T>(x1 * c + x0 * s);
        }
        a.store(out + i0);
        bb.store(out + half + i0);
      }
    }
    const int64_t tail = v.head_dim - p.rotary_dim;
    if (!p.copy_tail || tail <= 0) continue;
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
}

// True when every row of q and k starts on a 16-byte boundary at element offset `elem_off`
// (and so every chunk of 16 / sizeof(T) elements from there).
template <typename T>
bool rows_aligned(const RopeParams& p, int64_t elem_off) {
  // A stride matters only along a dim of size > 1.
  auto ok = [](int64_t stride, int64_t size) {
    return size <= 1 || (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  };
  if ((elem_off * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  for (int x = 0; x < p.n_tensors; ++x) {
    const RopeTensor& v = p.x[x];
    if (reinterpret_cast<uintptr_t>(v.in) % 16 != 0 || reinterpret_cast<uintptr_t>(v.out) % 16 != 0) {
      return false;
    }
    if (!ok(v.in_stride_b, p.batch) || !ok(v.in_stride_l, p.seqlen) || !ok(v.in_stride_h, v.heads) ||
        !ok(v.out_stride_b, p.batch) || !ok(v.out_stride_l, p.seqlen) || !ok(v.out_stride_h, v.heads)) {
      return false;
    }
  }
  return true;
}

template <typename T, int N, bool Vec, bool Interleaved>
cudaError_t launch_typed(const RopeParams& p, cudaStream_t stream) {
  using C = acc_t<T>;
  const int64_t half = p.rotary_dim / 2;
  const int64_t heads = p.x[0].heads + (p.n_tensors == 2 ? p.x[1].heads : 0);
  const int64_t units = heads * (half / N);
  // Threads per token: enough for its units, a warp at least; several tokens per block when
  // a token has little work (few heads), so blocks keep 256 threads busy.
  int tpt = 32;
  while (tpt < 256 && tpt < units) tpt *= 2;
  const int64_t table_bytes = 2 * half * static_cast<int64_t>(sizeof(C));
  int tpb = std::max<int>(1, 256 / tpt);
  tpb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tpb, (48 * 1024) / table_bytes)));
  const int64_t blocks = (p.tokens() + tpb - 1) / tpb;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  bool tail_vec = rows_aligned<T>(p, p.rotary_dim);
  for (int x = 0; x < p.n_tensors; ++x) {
    tail_vec = tail_vec && (p.x[x].head_dim - p.rotary_dim) % (16 / sizeof(T)) == 0;
  }
  return launch_kernel(rope_kernel<T, N, Vec, Interleaved>, dim3(static_cast<unsigned>(blocks)),
                       dim3(tpt, tpb), tpb * table_bytes, stream, p, tail_vec);
}

template <typename T>
cudaError_t launch_dtype(const RopeParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access
  const int64_t half = p.rotary_dim / 2;
  if (p.interleaved) {
    constexpr int kPairs = kVec / 2;
    if (half % kPairs == 0 && rows_aligned<T>(p, 0)) {
      return launch_typed<T, kPairs, true, true>(p, stream);
    }
    return launch_typed<T, 1, false, true>(p, stream);
  }
  if (half % kVec == 0 && rows_aligned<T>(p, 0) && rows_aligned<T>(p, half)) {
    return launch_typed<T, kVec, true, false>(p, stream);
  }
  return launch_typed<T, 1, false, false>(p, stream);
}

}  // namespace

cudaError_t launch_rope(const RopeParams& p, RopeDtype dtype, cudaStream_t stream) {
  const int64_t heads = p.x[0].heads + (p.n_tensors == 2 ? p.x[1].heads : 0);
  if (p.tokens() == 0 || heads == 0) return cudaSuccess;
  switch (dtype) {
    case RopeDtype::kFloat32: return launch_dtype<float>(p, stream);
    case RopeDtype::kFloat64: return launch_dtype<double>(p, stream);
    case RopeDtype::kFloat16: return launch_dtype<__half>(p, stream);
    case RopeDtype::kBFloat16: return launch_dtype<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace longattn::cuda
