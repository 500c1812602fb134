// CPU implementations of the longattn ops: allocate outputs, build params, dispatch dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "attention_args.h"
#include "cpu/attention_kernels.h"
#include "cpu/backward_buffers.h"
#include "cpu/merge.h"

namespace longattn::cpu {
namespace {

#define LONGATTN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> attention_cpu(const AttentionArgs& args) {
  AttentionParams p = make_attention_params(args);
  const ForwardTensors t = make_forward_tensors(args, &p);
  LONGATTN_DISPATCH(args.q.scalar_type(), "longattn::attention",
                    [&] { attention_forward<scalar_t>(p); });
  return {t.out, t.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const AttentionArgs& args, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
    const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor& q = args.q;
  AttentionParams p = make_attention_params(args);
  const BackwardTensors t = prepare_backward(args, &p, dout, out, lse, dlse);

  const BackwardScratch s = make_backward_buffers(args, p, t);
  LONGATTN_DISPATCH(q.scalar_type(), "longattn::attention_backward",
                    [&] { attention_backward<scalar_t>(p, s.g); });
  return {t.dq, t.dk, t.dv, t.dsink};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("attention", &attention_op<&attention_cpu>);
  m.impl("attention_backward", &attention_backward_op<&attention_backward_cpu>);
  m.impl("merge_attention", &merge_attention_cpu);
  m.impl("merge_attention_backward", &merge_attention_backward_cpu);
  m.impl("merge_attention_", &merge_attention_inplace_cpu);
}

}  // namespace longattn::cpu
