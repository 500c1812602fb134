// CUDA in-place compaction of a KV cache (compact_ and compact_rerotate_).
//
// 1. compact_validate_kernel, one CTA per (b, h): the keep list checked by the CPU's rule
//    (kv::first_bad_keep_in over a range per thread; the smallest bad entry wins), the length
//    and count in range; a status per (b, h) and a global error flag. For compact_rerotate_
//    it also stores each kept key's shift new_positions[j] - positions[keep[j]], read before
//    anything moves.
// 2. The moves, which do nothing when the flag is set (the host reports the status).
//    Rows move down (keep ascending, so keep[j] >= j). A (b, h) row set is cut into column
//    slices of 32 bytes, one CTA each: every slice is an independent in-place compaction of
//    its own bytes, so B * H * (row bytes / 32) CTAs share the work with no inter-CTA
//    synchronization. Inside a CTA, rows go in chunks of increasing j; all of a chunk's
//    sources (rows >= the chunk's first row) are read into registers, __syncthreads, then the
//    chunk's rows are written. Later chunks read only rows past this chunk's, and this chunk's
//    reads precede every later write (the barrier), so no source is overwritten before it is
//    read. A meta slice moves positions and scores (compact_rerotate_: writes new_positions).
// 3. compact_rerotate_: the rotary part of K moves through compact_rotate_kernel, slices of
//    rotation units (NeoX: elements i and i + rotary_dim / 2; interleaved: 2i, 2i + 1) with the
//    same chunk discipline, rotated by the stored shift with common/rope_math.h's exact angle
//    (as rerotate_keys) on the way; the rest of K (past rotary_dim), V and the meta slice go
//    through the plain moves. The two kernels touch disjoint bytes.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/kvcache_math.h"
#include "common/rope_math.h"
#include "cuda/kvcache/kv_device.cuh"
#include "cuda/kvcache/kvcache_launch.h"

namespace longattn::cuda {
namespace {

using namespace kv_device;

constexpr int kThreads = 256;
constexpr int kPerThread = 4;     // units each thread holds per chunk (loads in flight)
constexpr int kSliceBytes = 32;   // one DRAM sector of each row per slice

__global__ void __launch_bounds__(kThreads) compact_validate_kernel(const CompactParams p) {
  const int64_t x = blockIdx.x, b = x / p.H, h = x % p.H;
  __shared__ int32_t first_bad;
  if (threadIdx.x == 0) first_bad = INT_MAX;
  __syncthreads();
  const int64_t L = length_at(p.lengths, b, h), n = p.keep_lengths[x];
  const int64_t* ix = p.keep + x * p.K;
  int32_t status = kKeepOk;
  if (L < 0 || L > p.C) {
    status = kBadLength;
  } else if (n < 0 || n > p.K) {
    status = kBadKeepLength;
  } else {
    const int64_t per = (n + kThreads - 1) / kThreads;
    const int64_t begin = threadIdx.x * per, end = begin + per < n ? begin + per : n;
    if (begin < end) {
      const int64_t bad = kv::first_bad_keep_in(ix, 1, begin, end, L);
      if (bad >= 0) atomicMin(&first_bad, static_cast<int32_t>(bad));
    }
  }
  __syncthreads();  // status is uniform over the CTA, so every thread reaches this
  if (status == kKeepOk && first_bad != INT_MAX) status = first_bad;
  if (status == kKeepOk && p.shifts != nullptr) {
    const int64_t* pos = p.positions + b * p.ps[0] + h * p.ps[1];
    const int64_t* np = p.new_positions + b * p.ns[0] + h * p.ns[1];
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      p.shifts[x * p.K + j] = np[j * p.ns[2]] - pos[ix[j] * p.ps[2]];
    }
  }
  if (threadIdx.x == 0) {
    p.status[x] = status;
    if (status != kKeepOk) atomicExch(p.error_flag, 1);
  }
}

// The in-place discipline every mover follows (see the top of the file): the n kept rows in
// chunks of increasing j; unit u of a chunk is (row j0 + u / units_per_row, unit
// u % units_per_row), units at or past units_in_row are idle. read(t, j, s, unit) loads the
// unit of source row s = keep[j] into the thread's slot t and returns whether row j needs a
// write; write(t, j, unit) stores slot t into row j after the barrier.
template <typename Read, typename Write>
__device__ __forceinline__ void chunked_moves(const int64_t* ix, int64_t n, int units_per_row,
                                              int units_in_row, Read&& read, Write&& write) {
  const int rows_per_chunk = kThreads * kPerThread / units_per_row;
  for (int64_t j0 = 0; j0 < n; j0 += rows_per_chunk) {
    int64_t dst[kPerThread];
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int u = t * kThreads + threadIdx.x;
      const int64_t j = j0 + u / units_per_row;
      const int unit = u % units_per_row;
      dst[t] = j < n && unit < units_in_row && read(t, j, ix[j], unit) ? j : -1;
    }
    __syncthreads();  // the chunk's sources are read before its rows are written
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      if (dst[t] >= 0) write(t, dst[t], (t * kThreads + threadIdx.x) % units_per_row);
    }
  }
}

// Byte ranges of a row the plain moves own: K [k_begin, k_end) (past the rotary part for
// compact_rerotate_), V [0, v_end); slices of kSliceBytes, then the meta slice.
struct MoveGeometry {
  int64_t k_begin = 0, k_end = 0, v_end = 0, elem_size = 0;
  int64_t k_slices = 0, v_slices = 0;
  bool meta = false;
};

// positions and scores of the kept rows; compact_rerotate_ writes new_positions instead of
// moving positions.
__device__ __forceinline__ void move_meta(const CompactParams& p, int64_t b, int64_t h,
                                          const int64_t* ix, int64_t n) {
  int64_t* pos = p.positions ? p.positions + b * p.ps[0] + h * p.ps[1] : nullptr;
  float* sc = p.scores ? p.scores + b * p.ss[0] + h * p.ss[1] : nullptr;
  const int64_t* np = p.new_positions ? p.new_positions + b * p.ns[0] + h * p.ns[1] : nullptr;
  int64_t pv[kPerThread];
  float sv[kPerThread];
  chunked_moves(
      ix, n, 1, 1,
      [&](int t, int64_t j, int64_t s, int) {
        if (np != nullptr) {
          pv[t] = np[j * p.ns[2]];
        } else if (pos != nullptr && s != j) {
          pv[t] = pos[s * p.ps[2]];
        }
        if (sc != nullptr && s != j) sv[t] = sc[s * p.ss[2]];
        return s != j || np != nullptr;
      },
      [&](int t, int64_t j, int) {
        const bool moved = ix[j] != j;
        if (pos != nullptr && (np != nullptr || moved)) pos[j * p.ps[2]] = pv[t];
        if (sc != nullptr && moved) sc[j * p.ss[2]] = sv[t];
      });
}

// W: the copy word (2, 4, 8 or 16 bytes), aligned for every row, stride and range.
template <typename W>
__global__ void __launch_bounds__(kThreads) compact_move_kernel(const CompactParams p,
                                                                const MoveGeometry g) {
  if (*p.error_flag != 0) return;
  const int64_t x = blockIdx.x, b = x / p.H, h = x % p.H;
  const int64_t n = p.keep_lengths[x];
  const int64_t* ix = p.keep + x * p.K;
  const int64_t slice = blockIdx.y;
  if (slice == g.k_slices + g.v_slices) {
    move_meta(p, b, h, ix, n);
    return;
  }
  const bool is_k = slice < g.k_slices;
  const int64_t row_stride = (is_k ? p.ks[2] : p.vs[2]) * g.elem_size;
  const int64_t b0 = is_k ? g.k_begin + slice * kSliceBytes : (slice - g.k_slices) * kSliceBytes;
  const int64_t b_end = is_k ? g.k_end : g.v_end;
  char* col = static_cast<char*>(is_k ? p.k : p.v) + b0 +
              (is_k ? b * p.ks[0] + h * p.ks[1] : b * p.vs[0] + h * p.vs[1]) * g.elem_size;
  const int words = static_cast<int>(
      ((b0 + kSliceBytes < b_end ? b0 + kSliceBytes : b_end) - b0) / static_cast<int64_t>(sizeof(W)));
  W w[kPerThread];
  chunked_moves(
      ix, n, kSliceBytes / static_cast<int>(sizeof(W)), words,
      [&](int t, int64_t j, int64_t s, int wi) {
        if (s == j) return false;
        w[t] = *reinterpret_cast<const W*>(col + s * row_stride + wi * sizeof(W));
        return true;
      },
      [&](int t, int64_t j, int wi) {
        *reinterpret_cast<W*>(col + j * row_stride + wi * sizeof(W)) = w[t];
      });
}

// The rotary part of K: units of N elements (NeoX: N at i and N at i + half; interleaved: N
// contiguous, N / 2 pairs), `units_per_slice` units of a row per CTA.
template <typename T, int N, bool Vec, bool Interleaved>
__global__ void __launch_bounds__(kThreads) compact_rotate_kernel(const CompactParams p,
                                                                  int units_per_slice) {
  static_assert(!Interleaved || N % 2 == 0, "interleaved units hold whole pairs");
  using C = acc_t<T>;
  if (*p.error_flag != 0) return;
  const int64_t x = blockIdx.x, b = x / p.H, h = x % p.H;
  const int64_t n = p.keep_lengths[x];
  const int64_t* shifts = p.shifts + x * p.K;
  const int64_t half = p.rotary_dim / 2;
  const int64_t units = (Interleaved ? p.rotary_dim : half) / N;
  const int64_t u0 = static_cast<int64_t>(blockIdx.y) * units_per_slice;
  const int in_slice = static_cast<int>(units - u0 < units_per_slice ? units - u0 : units_per_slice);
  T* kb = static_cast<T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  Elems<T, N, Vec> lo[kPerThread], hi[kPerThread];
  chunked_moves(
      p.keep + x * p.K, n, units_per_slice, in_slice,
      [&](int t, int64_t j, int64_t s, int ui) {
        if (s == j && shifts[j] == 0) return false;
        const T* src = kb + s * p.ks[2] + (u0 + ui) * N;
        lo[t].load(src);
        if constexpr (!Interleaved) hi[t].load(src + half);
        return true;
      },
      [&](int t, int64_t j, int ui) {
        const int64_t i0 = (u0 + ui) * N;  // first element of the unit
        const int64_t shift = shifts[j];
        if (shift != 0) {
          constexpr int kPairs = Interleaved ? N / 2 : N;
#pragma unroll
          for (int e = 0; e < kPairs; ++e) {
            const int64_t pair = Interleaved ? i0 / 2 + e : i0 + e;
            const double f =
                p.inv_freq_fp64 ? static_cast<const double*>(p.inv_freq)[pair]
                                : static_cast<double>(static_cast<const float*>(p.inv_freq)[pair]);
            C sn, cs, y0, y1;
            rope::rope_sincos<C>(shift, f, &sn, &cs);
            T& a = Interleaved ? lo[t].v[2 * e] : lo[t].v[e];
            T& c = Interleaved ? lo[t].v[2 * e + 1] : hi[t].v[e];
            rope::rotate_pair<C>(to_acc(a), to_acc(c), cs, sn, &y0, &y1);
            a = from_acc<T>(y0);
            c = from_acc<T>(y1);
          }
        }
        T* dst = kb + j * p.ks[2] + i0;
        lo[t].store(dst);
        if constexpr (!Interleaved) hi[t].store(dst + half);
      });
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T, int N, bool Vec, bool Interleaved>
cudaError_t launch_rotate_units(const CompactParams& p, cudaStream_t stream) {
  const int64_t units = (Interleaved ? p.rotary_dim : p.rotary_dim / 2) / N;
  const int per_slice = static_cast<int>(
      std::max<int64_t>(1, kSliceBytes / (N * static_cast<int64_t>(sizeof(T)))));
  const int64_t slices = (units + per_slice - 1) / per_slice;
  if (slices > 65535) return cudaErrorInvalidConfiguration;
  return launch_kernel(compact_rotate_kernel<T, N, Vec, Interleaved>,
                       dim3(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>(slices)),
                       kThreads, 0, stream, p, per_slice);
}

template <typename T>
cudaError_t launch_rotate(const CompactParams& p, cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(T);
  const int64_t half = p.rotary_dim / 2;
  bool vec = aligned(p.k, 16);
  for (int64_t s : p.ks) vec = vec && s % kV == 0;
  if (p.interleaved) {
    if (vec && p.rotary_dim % kV == 0 && kV % 2 == 0) {
      return launch_rotate_units<T, (kV % 2 == 0 ? kV : 2), true, true>(p, stream);
    }
    return launch_rotate_units<T, 2, false, true>(p, stream);
  }
  if (vec && half % kV == 0) return launch_rotate_units<T, kV, true, false>(p, stream);
  return launch_rotate_units<T, 1, false, false>(p, stream);
}

template <typename W>
cudaError_t launch_moves(const CompactParams& p, const MoveGeometry& g, cudaStream_t stream) {
  const int64_t slices = g.k_slices + g.v_slices + (g.meta ? 1 : 0);
  if (slices == 0) return cudaSuccess;
  if (slices > 65535) return cudaErrorInvalidConfiguration;
  return launch_kernel(compact_move_kernel<W>,
                       dim3(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>(slices)),
                       kThreads, 0, stream, p, g);
}

int64_t element_size(KernelDtype dtype) {
  switch (dtype) {
    case KernelDtype::kFloat64: return 8;
    case KernelDtype::kFloat32: return 4;
    default: return 2;
  }
}

}  // namespace

cudaError_t launch_compact(const CompactParams& p, KernelDtype dtype, cudaStream_t stream) {
  const int64_t bh = p.B * p.H;
  if (bh == 0) return cudaSuccess;
  if (bh > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cudaError_t e = cudaMemsetAsync(p.error_flag, 0, sizeof(int32_t), stream);
  if (e != cudaSuccess) return e;
  e = launch_kernel(compact_validate_kernel, static_cast<unsigned>(bh), kThreads, 0, stream, p);
  if (e != cudaSuccess) return e;

  const bool rotate = p.new_positions != nullptr;
  if (rotate) {
    switch (dtype) {
      case KernelDtype::kFloat32: e = launch_rotate<float>(p, stream); break;
      case KernelDtype::kFloat64: e = launch_rotate<double>(p, stream); break;
      case KernelDtype::kFloat16: e = launch_rotate<__half>(p, stream); break;
      case KernelDtype::kBFloat16: e = launch_rotate<__nv_bfloat16>(p, stream); break;
    }
    if (e != cudaSuccess) return e;
  }

  MoveGeometry g;
  g.elem_size = element_size(dtype);
  g.k_begin = rotate ? p.rotary_dim * g.elem_size : 0;
  g.k_end = p.D * g.elem_size;
  g.v_end = p.Dv * g.elem_size;
  g.k_slices = (g.k_end - g.k_begin + kSliceBytes - 1) / kSliceBytes;
  g.v_slices = (g.v_end + kSliceBytes - 1) / kSliceBytes;
  g.meta = p.positions != nullptr || p.scores != nullptr;
  // The widest copy word every row start, stride and range boundary is aligned to.
  int64_t word = 16;
  auto fit = [&](int64_t bytes) {
    while (word > 2 && bytes % word != 0) word /= 2;
  };
  fit(static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.k)));
  fit(static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.v)));
  for (int d = 0; d < 3; ++d) {
    fit(p.ks[d] * g.elem_size);
    fit(p.vs[d] * g.elem_size);
  }
  fit(g.k_begin);
  fit(g.k_end);
  fit(g.v_end);
  switch (word) {
    case 16: return launch_moves<uint4>(p, g, stream);
    case 8: return launch_moves<uint2>(p, g, stream);
    case 4: return launch_moves<uint32_t>(p, g, stream);
    default: return launch_moves<uint16_t>(p, g, stream);
  }
}

}  // namespace longattn::cuda
