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

#include "common/rope_math.h"
#include "common/rope_params.h"
#include "cuda/device_common.cuh"
#include "cuda/rope_device.cuh"
#include "cuda/rope_launch.h"

namespace longattn::cuda {
namespace {

// Each thread of a token rotates units of N pairs of a head (rope_device::RopeUnit).
template <typename T, int N, bool Vec, bool Interleaved>
__global__ void __launch_bounds__(256) rope_kernel(const RopeParams p, bool tail_vec) {
  using C = acc_t<T>;
  const int64_t half = p.rotary_dim / 2;
  C* cos_t = dynamic_smem<C>() + threadIdx.y * 2 * half;
  C* sin_t = cos_t + half;

  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = t < p.tokens();
  const int64_t b = active ? t / p.seqlen : 0, l = active ? t % p.seqlen : 0;
  if (active) rope_device::fill_table<C>(p, p.position(b, l), cos_t, sin_t);
  __syncthreads();
  if (!active) return;

  const int64_t units_per_row = half / N;
  for (int x = 0; x < p.n_tensors; ++x) {
    const RopeTensor& v = p.x[x];
    const T* in_tok = static_cast<const T*>(v.in) + b * v.in_stride_b + l * v.in_stride_l;
    T* out_tok = static_cast<T*>(v.out) + b * v.out_stride_b + l * v.out_stride_l;
    const int64_t units = v.heads * units_per_row;
    for (int64_t w = threadIdx.x; w < units; w += blockDim.x) {
      const int64_t h = w / units_per_row, i0 = (w % units_per_row) * N;
      rope_device::RopeUnit<T, N, Vec, Interleaved> a;
      a.load(in_tok + h * v.in_stride_h, half, i0);
      rope_device::rotate_unit(a, i0, cos_t, sin_t);
      a.store(out_tok + h * v.out_stride_h, half, i0);
    }
    rope_device::copy_tail<T>(p, v, in_tok, out_tok, tail_vec);
  }
}

template <typename T, int N, bool Vec, bool Interleaved>
cudaError_t launch_typed(const RopeParams& p, cudaStream_t stream) {
  using C = acc_t<T>;
  const int64_t half = p.rotary_dim / 2;
  // Threads per token: enough for its units; several tokens per block when a token has little
  // work (few heads), so blocks keep 256 threads busy.
  const int tpt = rope_device::threads_per_token(rope_device::total_heads(p) * (half / N));
  const int64_t table_bytes = 2 * half * static_cast<int64_t>(sizeof(C));
  int tpb = std::max<int>(1, 256 / tpt);
  tpb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tpb, (48 * 1024) / table_bytes)));
  const int64_t blocks = (p.tokens() + tpb - 1) / tpb;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch_kernel(rope_kernel<T, N, Vec, Interleaved>, dim3(static_cast<unsigned>(blocks)),
                       dim3(tpt, tpb), tpb * table_bytes, stream, p,
                       rope_device::tail_vectorizable<T>(p));
}

template <typename T>
cudaError_t launch_dtype(const RopeParams& p, cudaStream_t stream) {
  return rope_device::with_row_access<T>(p, [&](auto n, auto vec, auto interleaved) {
    return launch_typed<T, decltype(n)::value, decltype(vec)::value, decltype(interleaved)::value>(
        p, stream);
  });
}

}  // namespace

cudaError_t launch_rope(const RopeParams& p, KernelDtype dtype, cudaStream_t stream) {
  if (p.tokens() == 0 || rope_device::total_heads(p) == 0) return cudaSuccess;
  switch (dtype) {
    case KernelDtype::kFloat32: return launch_dtype<float>(p, stream);
    case KernelDtype::kFloat64: return launch_dtype<double>(p, stream);
    case KernelDtype::kFloat16: return launch_dtype<__half>(p, stream);
    case KernelDtype::kBFloat16: return launch_dtype<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace longattn::cuda
