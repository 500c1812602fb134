// Host side of the Hopper forward for one traits type: the TMA descriptors of q, k and v, the
// grid (flash/fwd_plan.h's), the shared-memory opt-in and the launch. Included only by the
// instance files, so each .cu compiles one kernel.
#pragma once
#include <cuda_runtime_api.h>

#include <type_traits>

#include "cuda/attention/flash/fwd_plan.h"
#include "cuda/attention/sm90/fwd_kernel.h"
#include "cuda/attention/sm90/fwd_traits.h"
#include "cuda/attention/sm90/instances.h"

namespace longattn::cuda::sm90 {

// A TMA descriptor takes strides that are multiples of 16 bytes; a dimension of extent 1 is
// never stepped, so any such stride stands in for whatever the caller gave (0 included).
template <class Tr>
int64_t tma_stride(int64_t stride, int64_t extent) {
  return extent > 1 ? stride : Tr::kHeadDim;
}

template <class Tr>
typename Tr::GmemTensor gmem_tensor(const void* ptr, int64_t rows, int64_t heads, int64_t batch,
                                    int64_t row_stride, int64_t head_stride, int64_t batch_stride) {
  using namespace cute;
  return make_tensor(make_gmem_ptr(static_cast<const typename Tr::Element*>(ptr)),
                     gmem_shape<Tr>(rows, heads, batch),
                     make_stride(tma_stride<Tr>(row_stride, rows), _1{}, tma_stride<Tr>(head_stride, heads),
                                 tma_stride<Tr>(batch_stride, batch)));
}

template <class Tr>
cudaError_t launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  using namespace cute;
  flash::FwdGrid grid;
  const cudaError_t bad = flash::fwd_grid<Tr, /*kPlainLogits=*/true>(p, &grid);
  if (bad != cudaSuccess || grid.empty()) return bad;
  if (p.seqlen_k <= 0 || p.heads_kv <= 0) return cudaErrorInvalidValue;  // no empty TMA extents

  const auto q = gmem_tensor<Tr>(p.q, p.seqlen_q, p.heads_q, p.batch, p.q_row_stride, p.q_head_stride,
                                 p.q_batch_stride);
  const auto k = gmem_tensor<Tr>(p.k, p.seqlen_k, p.heads_kv, p.batch, p.k_row_stride, p.k_head_stride,
                                 p.k_batch_stride);
  const auto v = gmem_tensor<Tr>(p.v, p.seqlen_k, p.heads_kv, p.batch, p.v_row_stride, p.v_head_stride,
                                 p.v_batch_stride);
  const Shape<Int<Tr::kBlockM>, Int<Tr::kHeadDim>> q_box;
  const Shape<Int<Tr::kBlockN>, Int<Tr::kHeadDim>> kv_box;
  const FwdArgs<Tr> args{p, make_tma_copy(SM90_TMA_LOAD{}, q, typename Tr::SmemLayoutQ{}, q_box, _1{}),
                         make_tma_copy(SM90_TMA_LOAD{}, k, take<0, 2>(typename Tr::SmemLayoutKV{}), kv_box, _1{}),
                         make_tma_copy(SM90_TMA_LOAD{}, v, take<0, 2>(typename Tr::SmemLayoutKV{}), kv_box, _1{})};

  const auto kernel = fwd_kernel<Tr>;
  constexpr int kSmem = Tr::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  const dim3 dim(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z));
  kernel<<<dim, Tr::kNThreads, kSmem, stream>>>(args);
  return cudaGetLastError();
}

template <Sm90Dtype kDtype, int kHeadDim>
cudaError_t sm90_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Element = std::conditional_t<kDtype == Sm90Dtype::kBf16, cute::bfloat16_t, cute::half_t>;
  return launch_fwd<FwdTraits<Element, kHeadDim>>(p, stream);
}

}  // namespace longattn::cuda::sm90
