// Argument checking of the rope ops shared by every backend: tensors and scalars in,
// RopeParams (inputs set, outputs not yet) out, errors naming the offending argument.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "common/rope_params.h"

namespace longattn {

RopeParams make_rope_params(const at::Tensor& q, const std::optional<at::Tensor>& k,
                            const at::Tensor& positions, const at::Tensor& inv_freq,
                            double attention_scaling, int64_t rotary_dim, bool interleaved,
                            bool inverse);

// Out of place: contiguous outputs like q and k (k_out is an empty 1-D tensor without k),
// pointers and strides set in p.
std::tuple<at::Tensor, at::Tensor> allocate_rope_outputs(RopeParams& p, const at::Tensor& q,
                                                         const std::optional<at::Tensor>& k);

// In place: outputs are the inputs; checks q and k do not overlap each other or themselves.
void set_rope_inplace(RopeParams& p, const at::Tensor& q, const std::optional<at::Tensor>& k);

// rope_backward: the gradients dq_out/dk_out of a rope(q, k, ..., inverse) call are rotated back
// (p.inverse is the negation of `inverse`), q and k are the forward's inputs (the saved views).
// Returns the params and (dq, dk, dinv_freq): contiguous dq/dk like q/k when input_grads (else
// empty 1-D tensors; so is dk without k), dinv_freq like inv_freq.
std::tuple<RopeParams, at::Tensor, at::Tensor, at::Tensor> make_rope_backward(
    const at::Tensor& dq_out, const std::optional<at::Tensor>& dk_out, const at::Tensor& q,
    const std::optional<at::Tensor>& k, const at::Tensor& positions, const at::Tensor& inv_freq,
    double attention_scaling, int64_t rotary_dim, bool interleaved, bool inverse,
    bool input_grads);

}  // namespace longattn
