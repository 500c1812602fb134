// CPU implementations of the longattn ops: allocate outputs, build params, dispatch dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "attention_args.h"
#include "cpu/attention_kernels.h"
#include "cpu/merge.h"

namespace longattn::cpu {
namespace {

// lse (and the backward's row statistics) are fp32, fp64 for fp64 inputs so that float64
// gradcheck sees an exact lse.
at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

#define LONGATTN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sink_logits,
    double scale, double softcap, double logn_base, bool causal, int64_t window_left,
    int64_t window_right, int64_t sinks, std::optional<int64_t> q_start, int64_t k_start,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const AttentionArgs args{q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sink_logits,
                           scale, softcap, logn_base, causal, window_left, window_right, sinks,
                           q_start, k_start, max_seqlen_q, max_seqlen_k};
  AttentionParams p = make_attention_params(args);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape(args), q.options().dtype(lse_dtype(q)));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  LONGATTN_DISPATCH(q.scalar_type(), "longattn::attention", [&] { attention_forward<scalar_t>(p); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sink_logits,
    double scale, double softcap, double logn_base, bool causal, int64_t window_left,
    int64_t window_right, int64_t sinks, std::optional<int64_t> q_start, int64_t k_start,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const AttentionArgs args{q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sink_logits,
                           scale, softcap, logn_base, causal, window_left, window_right, sinks,
                           q_start, k_start, max_seqlen_q, max_seqlen_k};
  AttentionParams p = make_attention_params(args);
  check_like_q(dout, q, "dout");
  check_like_q(out, q, "out");
  const auto lshape = lse_shape(args);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lshape) && lse.scalar_type() == lse_dtype(q),
                    "lse must be ", lse_dtype(q), " of shape ", at::IntArrayRef(lshape), ", got ",
                    lse.scalar_type(), " ", lse.sizes());
  if (dlse.has_value()) {
    TORCH_CHECK_VALUE(dlse->sizes() == lse.sizes(), "dlse must have lse's shape ", lse.sizes(),
                      ", got ", dlse->sizes());
  }
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  const at::Tensor dlse_c = dlse.has_value() ? dlse->to(lse_dtype(q)).contiguous() : at::Tensor();
  p.out = out_c.data_ptr();
  p.lse = lse_c.data_ptr();

  BackwardBuffers g;
  g.dq_chunks = backward_dq_chunks(p);
  const bool fp_acc = q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
  const bool dq_direct = g.dq_chunks == 1 && fp_acc;  // accumulate straight into dq
  at::Tensor dq = dq_direct ? at::zeros(q.sizes(), q.options()) : at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dsink = sink_logits.has_value() ? at::empty({p.heads_q}, sink_logits->options())
                                             : at::empty({0}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty(lse.sizes(), lse_c.options());
  g.dout = dout_c.data_ptr();
  g.dlse = dlse_c.defined() ? dlse_c.data_ptr() : nullptr;
  g.delta = delta.data_ptr();
  g.dq = dq.data_ptr();
  g.dk = dk.data_ptr();
  g.dv = dv.data_ptr();
  g.dsink = sink_logits.has_value() ? dsink.data_ptr() : nullptr;
  g.total_k = cu_seqlens_k.has_value() ? k.size(0) : k.size(0) * k.size(1);
  at::Tensor dq_accum;
  if (!dq_direct) {
    dq_accum = at::zeros({g.dq_chunks, q.numel()}, q.options().dtype(lse_dtype(q)));
    g.dq_accum = dq_accum.data_ptr();
  }
  LONGATTN_DISPATCH(q.scalar_type(), "longattn::attention_backward",
                    [&] { attention_backward<scalar_t>(p, g); });
  return {dq, dk, dv, dsink};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("merge_attention", &merge_attention_cpu);
  m.impl("merge_attention_backward", &merge_attention_backward_cpu);
}

}  // namespace longattn::cpu
