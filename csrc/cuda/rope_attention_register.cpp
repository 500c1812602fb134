// CUDA registrations of rope_attention and rope_attention_backward: the shared argument checks
// (rope_attention_args.h), attention's outputs and backward buffers, then the SIMT kernels
// (attention/remap/remap_launch.h) on the current stream of q's device. A tensor-core version
// does not exist yet: every dtype and head dim runs on the CUDA cores.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one wants cuSPARSE headers
#include <torch/library.h>

#include "cuda/attention/remap/remap_launch.h"
#include "cuda/kernel_dtype_of.h"
#include "rope_attention_args.h"

namespace longattn::cuda {
namespace {

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

std::tuple<at::Tensor, at::Tensor> rope_attention_cuda(const RopeAttentionArgs& args) {
  const at::Tensor& q = args.q;
  // Checks every tensor is on q's device before anything touches the GPU.
  RopeAttentionParams p = make_rope_attention_params(args);
  const c10::cuda::CUDAGuard guard(q.device());
  const ForwardTensors t = make_forward_tensors(args.attention(), &p.attn);
  const KernelDtype dt = kernel_dtype_of(q.scalar_type(), "rope_attention", "q");
  C10_CUDA_CHECK(remap_forward(p, dt, stream_of(q)));
  return {t.out, t.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rope_attention_backward_cuda(
    const RopeAttentionArgs& args, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
    const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor& q = args.q;
  RopeAttentionParams p = make_rope_attention_params(args);
  // dout, dlse, out and lse are checked against q's device here, before the guard takes it.
  const AttentionArgs attn = args.attention();
  const BackwardTensors t = prepare_backward(attn, &p.attn, dout, out, lse, dlse);
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionGrads g;
  g.dout = t.dout.data_ptr();
  g.dlse = t.dlse_ptr();
  g.dq = t.dq.data_ptr();
  g.dk = t.dk.data_ptr();
  g.dv = t.dv.data_ptr();
  g.dsink = t.dsink_ptr(attn);
  g.deterministic = true;  // the SIMT backward uses no atomics
  const KernelDtype dt = kernel_dtype_of(q.scalar_type(), "rope_attention_backward", "q");
  g.workspace_bytes = remap_backward_workspace(p, dt);
  at::Tensor workspace;
  if (g.workspace_bytes > 0) {
    workspace = at::zeros({static_cast<int64_t>(g.workspace_bytes)}, q.options().dtype(at::kByte));
    g.workspace = workspace.data_ptr();
  }
  C10_CUDA_CHECK(remap_backward(p, g, dt, stream_of(q)));
  return {t.dq, t.dk, t.dv, t.dsink};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("rope_attention", &rope_attention_op<&rope_attention_cuda>);
  m.impl("rope_attention_backward", &rope_attention_backward_op<&rope_attention_backward_cuda>);
}

}  // namespace longattn::cuda
