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

}  // namespace longattn
