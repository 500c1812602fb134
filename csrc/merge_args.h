// Shape checks of merge_attention shared by every backend. outs[i]: [*, L, H, D];
// lses[i]: [*, H, L] (the shapes attention returns, dense or varlen).
#pragma once
#include <ATen/core/Tensor.h>

namespace longattn {

struct MergeShape {
  int64_t rows;   // prod(*) * L
  int64_t outer;  // prod(*)
  int64_t L, H, D;
};

MergeShape check_merge_args(at::TensorList outs, at::TensorList lses);

// merge_attention_: the running out [*, L, H, D] / lse [*, H, L] and the partial
// part_out [*, n, H, D] / part_lse [*, H, n].
struct MergeIntoShape {
  int64_t outer;  // prod(*)
  int64_t L, n, H, D;
};

// out and lse contiguous in the accumulation type of part_out (fp64 for fp64, else fp32),
// part_lse fp32 or fp64, one device, 0 <= row_start <= L - n.
MergeIntoShape check_merge_into_args(const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& part_out, const at::Tensor& part_lse,
                                     int64_t row_start);

}  // namespace longattn
