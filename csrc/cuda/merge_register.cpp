// CUDA registrations of merge_attention, its backward and merge_attention_: the shared
// argument checks (merge_args.h), contiguous inputs and outputs, then the plain launches of
// merge_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one wants cuSPARSE headers
#include <torch/library.h>

#include <vector>

#include "cuda/kernel_dtype_of.h"
#include "cuda/merge_launch.h"
#include "merge_args.h"

namespace longattn::cuda {
namespace {

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

struct Inputs {
  MergeShape shape;
  std::vector<at::Tensor> outs, lses;  // contiguous; lses in the accumulation type
};

Inputs prepare(at::TensorList outs, at::TensorList lses) {
  Inputs in{check_merge_args(outs, lses), {}, {}};
  TORCH_CHECK_VALUE(static_cast<int>(outs.size()) <= kMaxMergePartials,
                    "merge_attention on CUDA takes at most ", kMaxMergePartials,
                    " partials per call, got ", outs.size(), " (merge them in groups)");
  const auto acc = acc_type(outs[0].scalar_type());
  for (size_t k = 0; k < outs.size(); ++k) {
    in.outs.push_back(outs[k].contiguous());
    in.lses.push_back(lses[k].to(acc).contiguous());
  }
  return in;
}

MergeParams params_of(const Inputs& in) {
  MergeParams p;
  p.n = static_cast<int>(in.outs.size());
  for (int k = 0; k < p.n; ++k) {
    p.outs[k] = in.outs[k].data_ptr();
    p.lses[k] = in.lses[k].data_ptr();
  }
  p.outer = in.shape.outer;
  p.L = in.shape.L;
  p.H = in.shape.H;
  p.D = in.shape.D;
  return p;
}

std::tuple<at::Tensor, at::Tensor> merge_attention_cuda(at::TensorList outs, at::TensorList lses) {
  const Inputs in = prepare(outs, lses);
  const c10::cuda::CUDAGuard guard(outs[0].device());
  at::Tensor out = at::empty(outs[0].sizes(), in.outs[0].options());
  at::Tensor lse = at::empty(lses[0].sizes(), in.lses[0].options());
  MergeParams p = params_of(in);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  const KernelDtype dt = kernel_dtype_of(out.scalar_type(), "merge_attention", "outs");
  C10_CUDA_CHECK(launch_merge_forward(
      p, dt, c10::cuda::getCurrentCUDAStream(out.device().index()).stream()));
  return {out, lse};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> merge_attention_backward_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, at::TensorList outs,
    at::TensorList lses, const at::Tensor& out, const at::Tensor& lse) {
  const Inputs in = prepare(outs, lses);
  TORCH_CHECK_VALUE(dout.sizes() == outs[0].sizes(), "dout must have shape ", outs[0].sizes(),
                    ", got ", dout.sizes());
  TORCH_CHECK_VALUE(out.sizes() == outs[0].sizes() && lse.sizes() == lses[0].sizes(),
                    "out/lse must be merge_attention's outputs");
  const c10::cuda::CUDAGuard guard(outs[0].device());
  const auto st = outs[0].scalar_type();
  const at::Tensor dout_c = dout.to(st).contiguous();
  const at::Tensor lse_c = lse.to(acc_type(st)).contiguous();
  const at::Tensor dlse_c = dlse ? dlse->to(acc_type(st)).contiguous() : at::Tensor();
  MergeParams p = params_of(in);
  p.dout = dout_c.data_ptr();
  p.dlse = dlse_c.defined() ? dlse_c.data_ptr() : nullptr;
  p.lse = const_cast<void*>(lse_c.data_ptr());  // read-only in the backward kernel
  std::vector<at::Tensor> douts, dlses;
  for (int k = 0; k < p.n; ++k) {
    douts.push_back(at::empty(outs[k].sizes(), in.outs[k].options()));
    dlses.push_back(at::empty(lses[k].sizes(), in.lses[k].options()));
    p.douts[k] = douts.back().data_ptr();
    p.dlses[k] = dlses.back().data_ptr();
  }
  const KernelDtype dt = kernel_dtype_of(st, "merge_attention_backward", "outs");
  C10_CUDA_CHECK(launch_merge_backward(
      p, dt, c10::cuda::getCurrentCUDAStream(dout.device().index()).stream()));
  for (int k = 0; k < p.n; ++k) dlses[k] = dlses[k].to(lses[k].scalar_type());  // grads match inputs
  return {douts, dlses};
}

void merge_attention_inplace_cuda(const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& part_out, const at::Tensor& part_lse,
                                  int64_t row_start) {
  const MergeIntoShape ms = check_merge_into_args(out, lse, part_out, part_lse, row_start);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor po = part_out.contiguous();
  const at::Tensor pl = part_lse.to(out.scalar_type()).contiguous();
  MergeIntoParams p;
  p.part_out = po.data_ptr();
  p.part_lse = pl.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.outer = ms.outer;
  p.L = ms.L;
  p.n = ms.n;
  p.H = ms.H;
  p.D = ms.D;
  p.row_start = row_start;
  const KernelDtype dt = kernel_dtype_of(po.scalar_type(), "merge_attention_", "part_out");
  C10_CUDA_CHECK(launch_merge_into(
      p, dt, c10::cuda::getCurrentCUDAStream(out.device().index()).stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("merge_attention", &merge_attention_cuda);
  m.impl("merge_attention_backward", &merge_attention_backward_cuda);
  m.impl("merge_attention_", &merge_attention_inplace_cuda);
}

}  // namespace longattn::cuda
