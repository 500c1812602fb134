// CUDA backward of rope when inv_freq needs a gradient (the CPU's cpu/rope_backward.cpp): the
// incoming gradients g of q and k are rotated back (dx, written when wanted) and
//   dinv_freq[i] = sign * sum over tokens of position * sum over heads of (x_a dx_b - x_b dx_a)
// for pair i, x the forward's input (saved), sign -1 when the forward was the inverse rotation.
//
// Deterministic, no atomics. Pass 1 (rope_freq_grad_kernel): a grid whose size depends on the
// problem only (tokens, heads, rotary_dim, dtype, alignment; never on the device) walks token
// groups of blockDim.y tokens. For each token, thread x of
// the token owns a unit u of N frequencies and a slot of heads (heads slot, slot + S, ...), and
// sums its heads in registers; the S slot sums of each frequency are added in slot order in
// shared memory, times the position in fp64, into the token row's running sum. At the end the
// rows are added in row order into one fp64 partial per (block, frequency). Pass 2
// (rope_freq_grad_finish): one warp per frequency adds the block partials, strided by lane, then
// a fixed butterfly. The sums over heads are in the compute type (fp32; fp64 for fp64), as on
// the CPU; the results match the CPU's up to summation order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/rope_math.h"
#include "common/rope_params.h"
#include "cuda/device_common.cuh"
#include "cuda/rope_device.cuh"
#include "cuda/rope_launch.h"

namespace longattn::cuda {
namespace {

constexpr int kMaxFreqGradBlocks = 1024;  // pass 1's grid (at most); rows of the workspace
constexpr int kFinishThreads = 256;       // pass 2: 8 warps, one frequency each

// Slots of heads per frequency unit: with G units per row and tpt threads per token, S threads
// share a unit when G < tpt (thread x: slot x / G, unit x % G), else one thread owns its units.
__host__ __device__ inline int head_slots(int64_t units_per_row, int tpt) {
  return units_per_row >= tpt ? 1 : static_cast<int>(tpt / units_per_row);
}

// Shared memory per token row: running fp64 sums (half), cos/sin (2 * half), slot sums (S * half).
template <typename C>
int64_t row_smem_bytes(int64_t half, int slots) {
  return half * static_cast<int64_t>(sizeof(double)) + (2 + slots) * half * static_cast<int64_t>(sizeof(C));
}

// One head's unit of N pairs: dx = rotation of g back (the table holds the backward's angle),
// stored unless dx is null, and acc[j] += x_a dx_b - x_b dx_a per pair.
template <typename T, int N, bool Vec, bool Interleaved, typename C>
__device__ __forceinline__ void unit_grad(const T* g, const T* x, T* dx, int64_t half, int64_t i0,
                                          const C* cos_t, const C* sin_t, C (&acc)[N]) {
  rope_device::RopeUnit<T, N, Vec, Interleaved> gu, xu;
  gu.load(g, half, i0);
  xu.load(x, half, i0);
  rope_device::rotate_unit(gu, i0, cos_t, sin_t, [&](int j, C d0, C d1) {
    acc[j] += to_acc(xu.first(j)) * d1 - to_acc(xu.second(j)) * d0;
  });
  if (dx != nullptr) gu.store(dx, half, i0);
}

// At least 4 blocks of 256 threads per SM (<= 64 registers): the kernel is memory-bound.
template <typename T, int N, bool Vec, bool Interleaved>
__global__ void __launch_bounds__(256, 3)
    rope_freq_grad_kernel(const RopeParams p, double* __restrict__ partials, bool tail_vec) {
  using C = acc_t<T>;
  const int64_t half = p.rotary_dim / 2;
  const int64_t units_per_row = half / N;
  const int tpt = blockDim.x, tx = threadIdx.x, ty = threadIdx.y, rows = blockDim.y;
  const int slots = head_slots(units_per_row, tpt);

  double* run = dynamic_smem<double>();  // rows x half
  C* tables = reinterpret_cast<C*>(run + rows * half);  // rows x (cos, sin)
  C* cos_t = tables + ty * 2 * half;
  C* sin_t = cos_t + half;
  C* slot_sum = tables + rows * 2 * half + ty * slots * half;  // this row: slots x half
  double* my_run = run + ty * half;
  // Thread tx adds into my_run[i] for i = tx (mod tpt) only, here and below: no race, no sync.
  for (int64_t i = tx; i < half; i += tpt) my_run[i] = 0.0;

  const bool owns_units = units_per_row >= tpt;
  const int slot = owns_units ? 0 : tx / static_cast<int>(units_per_row);
  const int64_t u_begin = owns_units ? tx : tx % units_per_row;
  const int64_t u_step = owns_units ? tpt : units_per_row;  // one unit when shared by slots
  const int64_t groups = (p.tokens() + rows - 1) / rows;

  // The loop bounds are the same for every thread of the block: the barriers are uniform.
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t t = grp * rows + ty;
    const bool active = t < p.tokens();
    const int64_t b = active ? t / p.seqlen : 0, l = active ? t % p.seqlen : 0;
    const int64_t pos = active ? p.position(b, l) : 0;
    if (active) rope_device::fill_table<C>(p, pos, cos_t, sin_t);
    __syncthreads();
    if (active && slot < slots) {
      for (int64_t u = u_begin; u < units_per_row; u += u_step) {
        C acc[N];
#pragma unroll
        for (int j = 0; j < N; ++j) acc[j] = C(0);
        const int64_t i0 = u * N;
        for (int xi = 0; xi < p.n_tensors; ++xi) {
          const RopeTensor& v = p.x[xi];
          for (int64_t h = slot; h < v.heads; h += slots) {
            const T* g = static_cast<const T*>(v.in) + b * v.in_stride_b + l * v.in_stride_l +
                         h * v.in_stride_h;
            const T* x = static_cast<const T*>(v.saved) + b * v.saved_stride_b +
                         l * v.saved_stride_l + h * v.saved_stride_h;
            T* dx = v.out == nullptr ? nullptr
                                     : static_cast<T*>(v.out) + b * v.out_stride_b +
                                           l * v.out_stride_l + h * v.out_stride_h;
            unit_grad<T, N, Vec, Interleaved, C>(g, x, dx, half, i0, cos_t, sin_t, acc);
          }
        }
#pragma unroll
        for (int j = 0; j < N; ++j) slot_sum[slot * half + i0 + j] = acc[j];
      }
    }
    if (active && p.copy_tail) {
      for (int xi = 0; xi < p.n_tensors; ++xi) {
        const RopeTensor& v = p.x[xi];
        rope_device::copy_tail<T>(p, v,
                                  static_cast<const T*>(v.in) + b * v.in_stride_b + l * v.in_stride_l,
                                  static_cast<T*>(v.out) + b * v.out_stride_b + l * v.out_stride_l,
                                  tail_vec);
      }
    }
    __syncthreads();
    if (active) {
      for (int64_t i = tx; i < half; i += tpt) {
        C d = C(0);
        for (int s = 0; s < slots; ++s) d += slot_sum[s * half + i];
        my_run[i] += static_cast<double>(pos) * static_cast<double>(d);
      }
    }
    __syncthreads();  // the next group rewrites the tables and the slot sums
  }

  // The loop ran at least once (gridDim.x <= groups) and ended on a barrier: every row is final.
  for (int64_t i = ty * tpt + tx; i < half; i += tpt * rows) {
    double sum = 0.0;
    for (int r = 0; r < rows; ++r) sum += run[r * half + i];
    partials[static_cast<int64_t>(blockIdx.x) * half + i] = sum;
  }
}

__global__ void __launch_bounds__(kFinishThreads)
    rope_freq_grad_finish(const double* __restrict__ partials, int64_t blocks, int64_t half,
                          double sign, void* grad_inv_freq, bool fp64) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (kFinishThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= half) return;  // i is the same for the 32 lanes of a warp: whole warps leave
  double sum = 0.0;
  for (int64_t blk = lane; blk < blocks; blk += 32) sum += partials[blk * half + i];
  sum = warp_sum(sum);
  if (lane == 0) {
    if (fp64) {
      static_cast<double*>(grad_inv_freq)[i] = sign * sum;
    } else {
      static_cast<float*>(grad_inv_freq)[i] = static_cast<float>(sign * sum);
    }
  }
}

// Pass 1's geometry, from the problem alone (never from the device): the workspace rows and the
// results are the same on any GPU.
struct FreqGradGeometry {
  int tpt = 32, rows = 1, slots = 1;
  int64_t blocks = 0, smem = 0;
};

template <typename T>
FreqGradGeometry freq_grad_geometry(const RopeParams& p, int n) {
  using C = acc_t<T>;
  const int64_t half = p.rotary_dim / 2;
  FreqGradGeometry geo;
  geo.tpt = rope_device::threads_per_token(rope_device::total_heads(p) * (half / n));
  geo.slots = head_slots(half / n, geo.tpt);
  const int64_t row_bytes = row_smem_bytes<C>(half, geo.slots);
  geo.rows = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(256 / geo.tpt, (48 * 1024) / row_bytes)));
  geo.smem = geo.rows * row_bytes;
  const int64_t groups = (p.tokens() + geo.rows - 1) / geo.rows;
  geo.blocks = std::min<int64_t>(groups, kMaxFreqGradBlocks);
  return geo;
}

template <typename T, int N, bool Vec, bool Interleaved>
cudaError_t launch_typed(const RopeParams& p, double* workspace, cudaStream_t stream) {
  const FreqGradGeometry geo = freq_grad_geometry<T>(p, N);
  const int64_t half = p.rotary_dim / 2;
  const cudaError_t err = launch_kernel(rope_freq_grad_kernel<T, N, Vec, Interleaved>,
                                        dim3(static_cast<unsigned>(geo.blocks)),
                                        dim3(geo.tpt, geo.rows), geo.smem, stream, p, workspace,
                                        rope_device::tail_vectorizable<T>(p));
  if (err != cudaSuccess) return err;
  const int64_t finish_blocks = (half + kFinishThreads / 32 - 1) / (kFinishThreads / 32);
  return launch_kernel(rope_freq_grad_finish, dim3(static_cast<unsigned>(finish_blocks)),
                       dim3(kFinishThreads), 0, stream, workspace, geo.blocks, half,
                       p.forward_angle_sign(), p.grad_inv_freq, p.inv_freq_fp64);
}

template <typename T>
cudaError_t launch_dtype(const RopeParams& p, double* workspace, cudaStream_t stream) {
  return rope_device::with_row_access<T>(p, [&](auto n, auto vec, auto interleaved) {
    return launch_typed<T, decltype(n)::value, decltype(vec)::value, decltype(interleaved)::value>(
        p, workspace, stream);
  });
}

template <typename F>
auto on_dtype(KernelDtype dtype, F&& f) {
  switch (dtype) {
    case KernelDtype::kFloat64: return f(double{});
    case KernelDtype::kFloat16: return f(__half{});
    case KernelDtype::kBFloat16: return f(__nv_bfloat16{});
    case KernelDtype::kFloat32: break;
  }
  return f(float{});
}

}  // namespace

int64_t rope_backward_workspace(const RopeParams& p, KernelDtype dtype) {
  if (p.tokens() == 0) return 0;
  return on_dtype(dtype, [&](auto zero) -> int64_t {
    using T = decltype(zero);
    int64_t rows = 0;
    rope_device::with_row_access<T>(p, [&](auto n, auto, auto) {
      rows = freq_grad_geometry<T>(p, decltype(n)::value).blocks;
      return cudaSuccess;
    });
    return rows * (p.rotary_dim / 2);
  });
}

cudaError_t launch_rope_backward(const RopeParams& p, KernelDtype dtype, double* workspace,
                                 cudaStream_t stream) {
  const int64_t half = p.rotary_dim / 2;
  if (p.tokens() == 0) {
    const size_t bytes = half * (p.inv_freq_fp64 ? sizeof(double) : sizeof(float));
    return cudaMemsetAsync(p.grad_inv_freq, 0, bytes, stream);
  }
  return on_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    return launch_dtype<T>(p, workspace, stream);
  });
}

}  // namespace longattn::cuda
