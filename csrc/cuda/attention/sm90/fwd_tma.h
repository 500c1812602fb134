// The Hopper forward's TMA descriptors, built on the host from the call's parameters: q, k and v
// as (row, head dim, head, batch) tensors, boxes of one Q tile and one K/V stage in their
// swizzled shared-memory layouts. Kept apart from the launch so host checks can build them.
#pragma once
#include <cute/tensor.hpp>

#include "cuda/attention/sm90/fwd_args.h"
#include "cuda/attention/sm90/fwd_traits.h"

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

// Needs non-empty q, k and v (the registration sends empty problems elsewhere).
template <class Tr>
FwdArgs<Tr> make_fwd_args(const AttentionParams& p) {
  using namespace cute;
  const auto q = gmem_tensor<Tr>(p.q, p.seqlen_q, p.heads_q, p.batch, p.q_row_stride, p.q_head_stride,
                                 p.q_batch_stride);
  const auto k = gmem_tensor<Tr>(p.k, p.seqlen_k, p.heads_kv, p.batch, p.k_row_stride, p.k_head_stride,
                                 p.k_batch_stride);
  const auto v = gmem_tensor<Tr>(p.v, p.seqlen_k, p.heads_kv, p.batch, p.v_row_stride, p.v_head_stride,
                                 p.v_batch_stride);
  const Shape<Int<Tr::kBlockM>, Int<Tr::kHeadDim>> q_box;
  const Shape<Int<Tr::kBlockN>, Int<Tr::kHeadDim>> kv_box;
  const auto kv_stage = take<0, 2>(typename Tr::SmemLayoutKV{});
  return FwdArgs<Tr>{p, make_tma_copy(SM90_TMA_LOAD{}, q, typename Tr::SmemLayoutQ{}, q_box, _1{}),
                     make_tma_copy(SM90_TMA_LOAD{}, k, kv_stage, kv_box, _1{}),
                     make_tma_copy(SM90_TMA_LOAD{}, v, kv_stage, kv_box, _1{})};
}

}  // namespace longattn::cuda::sm90
