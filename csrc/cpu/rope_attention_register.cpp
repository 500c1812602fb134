// CPU implementations of rope_attention and rope_attention_backward: the shared checks
// (rope_attention_args.h), attention's outputs and backward buffers, dtype dispatch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/backward_buffers.h"
#include "cpu/rope_attention_kernels.h"
#include "rope_attention_args.h"

namespace longattn::cpu {
namespace {

#define LONGATTN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> rope_attention_cpu(const RopeAttentionArgs& args) {
  RopeAttentionParams p = make_rope_attention_params(args);
  const ForwardTensors t = make_forward_tensors(args.attention(), &p.attn);
  LONGATTN_DISPATCH(args.q.scalar_type(), "longattn::rope_attention",
                    [&] { rope_attention_forward<scalar_t>(p); });
  return {t.out, t.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rope_attention_backward_cpu(
    const RopeAttentionArgs& args, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
    const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor& q = args.q;
  RopeAttentionParams p = make_rope_attention_params(args);
  const AttentionArgs attn = args.attention();
  const BackwardTensors t = prepare_backward(attn, &p.attn, dout, out, lse, dlse);

  const BackwardScratch s = make_backward_buffers(attn, p.attn, t);
  LONGATTN_DISPATCH(q.scalar_type(), "longattn::rope_attention_backward",
                    [&] { rope_attention_backward<scalar_t>(p, s.g); });
  return {t.dq, t.dk, t.dv, t.dsink};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("rope_attention", &rope_attention_op<&rope_attention_cpu>);
  m.impl("rope_attention_backward", &rope_attention_backward_op<&rope_attention_backward_cpu>);
}

}  // namespace longattn::cpu
