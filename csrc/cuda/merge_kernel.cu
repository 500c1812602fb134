// CUDA merge of partial attentions: one warp per (row, head). Memory-bound: each partial is
// read once, the merged row written once; weights come from common/merge.h (the CPU kernel's
// rule: fp32 accumulation, -inf partials weigh 0, all -inf gives 0 / -inf, no NaN).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/merge.h"
#include "cuda/device_common.cuh"
#include "cuda/merge_launch.h"

namespace longattn::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

// This warp's (row, head): item = (b * L + i) * H + h; lse index (b, h, i); out offset
// item * D. valid is false for the warps past the end (whole warps, so shuffles stay safe).
struct WarpRow {
  bool valid;
  int lane;
  int64_t lidx, off;
};

__device__ __forceinline__ WarpRow warp_row(const MergeParams& p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t h = item % p.H, row = item / p.H, b = row / p.L, i = row % p.L;
  return {item < p.outer * p.L * p.H, static_cast<int>(threadIdx.x % 32),
          (b * p.H + h) * p.L + i, item * p.D};
}

template <typename T>
__global__ void merge_forward_kernel(const MergeParams p) {
  using A = acc_t<T>;
  const WarpRow wr = warp_row(p);
  if (!wr.valid) return;
  const int lane = wr.lane;
  const int64_t lidx = wr.lidx, off = wr.off;
  A ls[kMaxMergePartials], w[kMaxMergePartials];
  for (int k = 0; k < p.n; ++k) ls[k] = static_cast<const A*>(p.lses[k])[lidx];
  const A merged = merge_weights<A>(ls, p.n, w);
  if (lane == 0) static_cast<A*>(p.lse)[lidx] = merged;
  for (int64_t d = lane; d < p.D; d += 32) {
    A acc = 0;
    for (int k = 0; k < p.n; ++k) {
      if (w[k] != A(0)) acc += w[k] * to_acc(static_cast<const T*>(p.outs[k])[off + d]);
    }
    static_cast<T*>(p.out)[off + d] = from_acc<T, A>(acc);
  }
}

// dout_k = w_k dout; dlse_k = w_k (dout . out_k - dout . out + dlse), with dout . out rebuilt
// from the partials in the accumulation type (as the CPU kernel does).
template <typename T>
__global__ void merge_backward_kernel(const MergeParams p) {
  using A = acc_t<T>;
  const WarpRow wr = warp_row(p);
  if (!wr.valid) return;
  const int lane = wr.lane;
  const int64_t lidx = wr.lidx, off = wr.off;
  const A m = static_cast<const A*>(p.lse)[lidx];
  const A dl = p.dlse ? static_cast<const A*>(p.dlse)[lidx] : A(0);
  const T* dout = static_cast<const T*>(p.dout);
  A w[kMaxMergePartials], g_dot[kMaxMergePartials];
  A g_dot_out = 0;
  for (int k = 0; k < p.n; ++k) {
    const A lk = static_cast<const A*>(p.lses[k])[lidx];
    w[k] = (m == -INFINITY || lk == -INFINITY) ? A(0) : ::exp(lk - m);
    A part = 0;
    for (int64_t d = lane; d < p.D; d += 32)
      part += to_acc(dout[off + d]) * to_acc(static_cast<const T*>(p.outs[k])[off + d]);
    g_dot[k] = warp_sum(part);
    g_dot_out += w[k] * g_dot[k];
  }
  for (int k = 0; k < p.n; ++k) {
    for (int64_t d = lane; d < p.D; d += 32)
      static_cast<T*>(p.douts[k])[off + d] = from_acc<T, A>(w[k] * to_acc(dout[off + d]));
    if (lane == 0) static_cast<A*>(p.dlses[k])[lidx] = w[k] * (g_dot[k] - g_dot_out + dl);
  }
}

template <typename T>
cudaError_t launch(const MergeParams& p, bool backward, cudaStream_t stream) {
  const int64_t items = p.outer * p.L * p.H;
  if (items == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((items + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(32 * kWarpsPerBlock);
  return launch_kernel(backward ? merge_backward_kernel<T> : merge_forward_kernel<T>, grid, block,
                       0, stream, p);
}

cudaError_t dispatch(const MergeParams& p, MergeDtype dtype, bool backward, cudaStream_t stream) {
  switch (dtype) {
    case MergeDtype::kFloat32: return launch<float>(p, backward, stream);
    case MergeDtype::kFloat64: return launch<double>(p, backward, stream);
    case MergeDtype::kFloat16: return launch<__half>(p, backward, stream);
    case MergeDtype::kBFloat16: return launch<__nv_bfloat16>(p, backward, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_merge_forward(const MergeParams& p, MergeDtype dtype, cudaStream_t stream) {
  return dispatch(p, dtype, false, stream);
}

cudaError_t launch_merge_backward(const MergeParams& p, MergeDtype dtype, cudaStream_t stream) {
  return dispatch(p, dtype, true, stream);
}

}  // namespace longattn::cuda
