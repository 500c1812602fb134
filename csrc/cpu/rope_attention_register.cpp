// CPU implementations of rope_attention and rope_attention_backward: the shared checks
// (rope_attention_args.h), attention's outputs and backward buffers, dtype dispatch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

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
  const at::Tensor &q = args.q, &k = args.k;
  RopeAttentionParams p = make_rope_attention_params(args);
  const AttentionArgs attn = args.attention();
  const BackwardTensors t = prepare_backward(attn, &p.attn, dout, out, lse, dlse);

  BackwardBuffers g;
  g.dq_chunks = backward_dq_chunks(p.attn);
  const bool fp_acc = q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
  const bool dq_direct = g.dq_chunks == 1 && fp_acc;  // accumulate straight into dq
  if (dq_direct) t.dq.zero_();
  at::Tensor delta = at::empty(t.lse.sizes(), t.lse.options());
  g.dout = t.dout.data_ptr();
  g.dlse = t.dlse_ptr();
  g.delta = delta.data_ptr();
  g.dq = t.dq.data_ptr();
  g.dk = t.dk.data_ptr();
  g.dv = t.dv.data_ptr();
  g.dsink = t.dsink_ptr(attn);
  g.total_k = args.cu_seqlens_k.has_value() ? k.size(0) : k.size(0) * k.size(1);
  at::Tensor dq_accum;
  if (!dq_direct) {
    dq_accum = at::zeros({g.dq_chunks, q.numel()}, q.options().dtype(lse_dtype(q)));
    g.dq_accum = dq_accum.data_ptr();
  }
  LONGATTN_DISPATCH(q.scalar_type(), "longattn::rope_attention_backward",
                    [&] { rope_attention_backward<scalar_t>(p, g); });
  return {t.dq, t.dk, t.dv, t.dsink};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("rope_attention", &rope_attention_op<&rope_attention_cpu>);
  m.impl("rope_attention_backward", &rope_attention_backward_op<&rope_attention_backward_cpu>);
}

}  // namespace longattn::cpu
