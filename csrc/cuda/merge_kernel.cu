// CUDA merge of partial attentions: one warp per (row, head). Memory-bound: each partial is
// read once, the merged row written once; weights come from common/merge.h (the CPU kernel's
// rule: fp32 accumulation, -inf partials weigh 0, all -inf gives 0 / -inf, no NaN). Also the
// running form in place (merge_attention_).
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

// One warp per (row i, head h) of the partial: item = (b * n + i) * H + h, which is also the
// partial's row offset / D. All lanes read the running lse before lane 0 overwrites it.
template <typename T>
__global__ void merge_into_kernel(const MergeIntoParams p) {
  using A = acc_t<T>;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (item >= p.outer * p.n * p.H) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t h = item % p.H, row = item / p.H, b = row / p.n, i = row % p.n;
  A* lse = static_cast<A*>(p.lse) + (b * p.H + h) * p.L + p.row_start + i;
  const RunningMerge<A> m =
      running_merge<A>(*lse, static_cast<const A*>(p.part_lse)[(b * p.H + h) * p.n + i]);
  const T* part = static_cast<const T*>(p.part_out) + item * p.D;
  A* out = static_cast<A*>(p.out) + ((b * p.L + p.row_start + i) * p.H + h) * p.D;
  const bool reads_run = m.reads_run();
  for (int64_t d = lane; d < p.D; d += 32)
    out[d] = m.apply(reads_run ? out[d] : A(0), to_acc(part[d]));
  __syncwarp();
  if (lane == 0) *lse = m.lse;
}

dim3 warps_grid(int64_t items) {
  return dim3(static_cast<unsigned>((items + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

template <typename T>
cudaError_t launch(const MergeParams& p, bool backward, cudaStream_t stream) {
  const int64_t items = p.outer * p.L * p.H;
  if (items == 0) return cudaSuccess;
  return launch_kernel(backward ? merge_backward_kernel<T> : merge_forward_kernel<T>,
                       warps_grid(items), dim3(32 * kWarpsPerBlock), 0, stream, p);
}

template <typename T>
cudaError_t launch(const MergeIntoParams& p, cudaStream_t stream) {
  const int64_t items = p.outer * p.n * p.H;
  if (items == 0) return cudaSuccess;
  return launch_kernel(merge_into_kernel<T>, warps_grid(items), dim3(32 * kWarpsPerBlock), 0,
                       stream, p);
}

// launch<T>(args...) with T the element type of dtype.
template <typename... Args>
cudaError_t dispatch(KernelDtype dtype, const Args&... args) {
  switch (dtype) {
    case KernelDtype::kFloat32: return launch<float>(args...);
    case KernelDtype::kFloat64: return launch<double>(args...);
    case KernelDtype::kFloat16: return launch<__half>(args...);
    case KernelDtype::kBFloat16: return launch<__nv_bfloat16>(args...);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_merge_forward(const MergeParams& p, KernelDtype dtype, cudaStream_t stream) {
  return dispatch(dtype, p, false, stream);
}

cudaError_t launch_merge_backward(const MergeParams& p, KernelDtype dtype, cudaStream_t stream) {
  return dispatch(dtype, p, true, stream);
}

cudaError_t launch_merge_into(const MergeIntoParams& p, KernelDtype dtype, cudaStream_t stream) {
  return dispatch(dtype, p, stream);
}

}  // namespace longattn::cuda
