// The CPU backward's buffers for an op's gradient tensors: where dQ accumulates (straight into
// dq, or per key chunk for a fixed-order reduction), the delta scratch. Shared by
// attention_backward and rope_attention_backward, whose kernels differ only in their scores.
#pragma once

#include <ATen/ATen.h>

#include "attention_args.h"
#include "cpu/attention_kernels.h"

namespace longattn::cpu {

// The buffers and the scratch tensors they point into (kept alive with them).
struct BackwardScratch {
  BackwardBuffers g;
  at::Tensor delta, dq_accum;
};

inline BackwardScratch make_backward_buffers(const AttentionArgs& args, const AttentionParams& p,
                                             const BackwardTensors& t) {
  const at::Tensor &q = args.q, &k = args.k;
  BackwardScratch s;
  BackwardBuffers& g = s.g;
  g.dq_chunks = backward_dq_chunks(p);
  const bool fp_acc = q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
  const bool dq_direct = g.dq_chunks == 1 && fp_acc;  // accumulate straight into dq
  if (dq_direct) t.dq.zero_();
  s.delta = at::empty(t.lse.sizes(), t.lse.options());
  g.dout = t.dout.data_ptr();
  g.dlse = t.dlse_ptr();
  g.delta = s.delta.data_ptr();
  g.dq = t.dq.data_ptr();
  g.dk = t.dk.data_ptr();
  g.dv = t.dv.data_ptr();
  g.dsink = t.dsink_ptr(args);
  g.total_k = args.cu_seqlens_k.has_value() ? k.size(0) : k.size(0) * k.size(1);
  if (!dq_direct) {
    s.dq_accum = at::zeros({g.dq_chunks, q.numel()}, q.options().dtype(lse_dtype(q)));
    g.dq_accum = s.dq_accum.data_ptr();
  }
  return s;
}

}  // namespace longattn::cpu
