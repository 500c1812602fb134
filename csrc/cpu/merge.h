// CPU implementations of merge_attention and its backward (see common/merge.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace longattn::cpu {

std::tuple<at::Tensor, at::Tensor> merge_attention_cpu(at::TensorList outs, at::TensorList lses);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> merge_attention_backward_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, at::TensorList outs,
    at::TensorList lses, const at::Tensor& out, const at::Tensor& lse);

// merge_attention_: the partial joins rows [row_start, row_start + n) of (out, lse) in place.
void merge_attention_inplace_cpu(const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& part_out, const at::Tensor& part_lse,
                                 int64_t row_start);

}  // namespace longattn::cpu
