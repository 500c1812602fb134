// CUDA registrations of the rope ops: the shared argument checks, outputs, then the plain
// launch functions of rope_kernel.cu / rope_backward_kernel.cu on the current stream of q's
// device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one wants cuSPARSE headers
#include <torch/library.h>

#include "cuda/kernel_dtype_of.h"
#include "cuda/rope_launch.h"
#include "rope_args.h"

namespace longattn::cuda {
namespace {

void check_rotary_dim(const RopeParams& p) {
  TORCH_CHECK_VALUE(p.rotary_dim <= kMaxRotaryDimCuda, "rotary_dim = ", p.rotary_dim,
                    " exceeds the CUDA kernel's limit of ", kMaxRotaryDimCuda);
}

void launch(const RopeParams& p, const at::Tensor& q) {
  check_rotary_dim(p);
  C10_CUDA_CHECK(launch_rope(p, kernel_dtype_of(q.scalar_type(), "rope", "q"),
                             c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k,
                                             const at::Tensor& positions, const at::Tensor& inv_freq,
                                             double attention_scaling, int64_t rotary_dim,
                                             bool interleaved, bool inverse) {
  const c10::cuda::CUDAGuard guard(q.device());
  RopeParams p = make_rope_params(q, k, positions, inv_freq, attention_scaling, rotary_dim,
                                  interleaved, inverse);
  auto outs = allocate_rope_outputs(p, q, k);
  launch(p, q);
  return outs;
}

void rope_inplace_cuda(const at::Tensor& q, const std::optional<at::Tensor>& k,
                       const at::Tensor& positions, const at::Tensor& inv_freq,
                       double attention_scaling, int64_t rotary_dim, bool interleaved, bool inverse) {
  const c10::cuda::CUDAGuard guard(q.device());
  RopeParams p = make_rope_params(q, k, positions, inv_freq, attention_scaling, rotary_dim,
                                  interleaved, inverse);
  set_rope_inplace(p, q, k);
  launch(p, q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_backward_cuda(
    const at::Tensor& dq_out, const std::optional<at::Tensor>& dk_out, const at::Tensor& q,
    const std::optional<at::Tensor>& k, const at::Tensor& positions, const at::Tensor& inv_freq,
    double attention_scaling, int64_t rotary_dim, bool interleaved, bool inverse,
    bool input_grads) {
  const c10::cuda::CUDAGuard guard(dq_out.device());
  auto [p, dq, dk, dinv_freq] = make_rope_backward(dq_out, dk_out, q, k, positions, inv_freq,
                                                   attention_scaling, rotary_dim, interleaved,
                                                   inverse, input_grads);
  check_rotary_dim(p);
  const KernelDtype dtype = kernel_dtype_of(dq_out.scalar_type(), "rope_backward", "grad_q");
  at::Tensor workspace =
      at::empty({rope_backward_workspace(p, dtype)}, dq_out.options().dtype(at::kDouble));
  C10_CUDA_CHECK(launch_rope_backward(
      p, dtype, workspace.data_ptr<double>(),
      c10::cuda::getCurrentCUDAStream(dq_out.device().index()).stream()));
  return {dq, dk, dinv_freq};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("rope_", &rope_inplace_cuda);
  m.impl("rope_backward", &rope_backward_cuda);
}

}  // namespace longattn::cuda
