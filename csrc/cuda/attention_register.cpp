// CUDA registrations of attention and attention_backward: the shared argument checks
// (attention_args.h), outputs and workspace, then one of the backends (attention_launch.h):
//   flash: tensor-core kernels, fp16/bf16 with a head dim in kFlashHeadDims, when q/k/v (and
//          dout/out) start 16-byte aligned, every q/k/v stride but the head dim's is a
//          multiple of 8 elements, the GPU is sm_80 or newer and, for the backward, a block
//          can have the shared memory of a backward configuration (flash_backward_smem);
//   simt:  CUDA-core kernels for everything else (fp32, fp64, any head dim <= 256);
//   sm90:  the Hopper forward (wgmma + TMA), only when asked for: it has not been verified on
//          a GPU, so auto never picks it. It needs a build with LONGATTN_WITH_SM90, a compute
//          capability 9.0 device, flash's alignment and strides, and what sm90_unsupported
//          accepts; the backward of an sm90 call runs as under auto.
// LONGATTN_CUDA_BACKEND=auto|flash|simt|sm90 overrides the choice, so tests can compare them;
// forcing flash or sm90 where it cannot run is an error saying why.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one wants cuSPARSE headers
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>

#include "attention_args.h"
#include "cuda/attention/attention_launch.h"
#include "cuda/attention/sm90/support.h"
#include "cuda/kernel_dtype_of.h"

namespace longattn::cuda {
namespace {

enum class Backend { kAuto, kFlash, kSimt, kSm90 };

Backend requested_backend() {
  const char* env = std::getenv("LONGATTN_CUDA_BACKEND");
  const std::string v = env != nullptr ? env : "";
  if (v.empty() || v == "auto") return Backend::kAuto;
  if (v == "flash") return Backend::kFlash;
  if (v == "simt") return Backend::kSimt;
  if (v == "sm90") return Backend::kSm90;
  TORCH_CHECK_VALUE(false, "LONGATTN_CUDA_BACKEND must be auto, flash, simt or sm90, got '", v, "'");
}

// The tensor-core kernels' demands on q/k/v in memory: 16-byte loads (cp.async, TMA) from
// 16-byte aligned starts, rows and heads at multiples of 8 elements. `who` names the kernels.
std::string layout_unsupported(const char* who, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    if (!aligned(t->data_ptr())) {
      return std::string("the ") + who + " kernels need 16-byte aligned tensors; " + name +
             " starts at a misaligned address (a sliced view?)";
    }
    for (int64_t d = 0; d + 1 < t->dim(); ++d) {
      if (t->stride(d) % 8 != 0) {
        return std::string("the ") + who + " kernels need strides that are multiples of 8 elements; " +
               name + " has strides " + c10::str(t->strides());
      }
    }
  }
  return {};
}

// Why the flash kernels cannot take this call; empty when they can. `extra` are further
// device pointers the kernels read with 16-byte loads (the backward's dout and out).
std::string flash_unsupported(const AttentionParams& p, KernelDtype dtype, bool backward,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              std::initializer_list<const void*> extra) {
  if (!flash_supported(dtype, p.head_dim)) {
    std::string dims;
    for (int d : kFlashHeadDims) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
    return "the flash kernels take float16/bfloat16 with head_dim in {" + dims + "}, got " +
           std::string(c10::toString(q.scalar_type())) + " with head_dim " +
           std::to_string(p.head_dim);
  }
  // Grid limits of the flash launches (heads on grid y; 32-bit key indices in the tiles).
  if (p.heads_q > 65535 || p.seqlen_k > (int64_t(1) << 30) || p.seqlen_q > (int64_t(1) << 30)) {
    return "the flash kernels take at most 65535 q heads and 2^30 tokens per sequence";
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                        q.device().index()));
  if (major < 8) {
    return "the flash kernels need compute capability 8.0 or newer, " + q.device().str() +
           " has " + std::to_string(major) + ".x";
  }
  if (backward) {
    int max_smem = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          q.device().index()));
    if (flash_backward_smem(p.head_dim, max_smem) == 0) {
      const size_t need = flash_backward_smem(p.head_dim, std::numeric_limits<int>::max());
      return "the flash backward at head_dim " + std::to_string(p.head_dim) + " needs " +
             std::to_string(need / 1024) + " KB of shared memory per block, " + q.device().str() +
             " offers " + std::to_string(max_smem / 1024) + " KB";
    }
  }
  if (std::string why = layout_unsupported("flash", q, k, v); !why.empty()) return why;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  for (const void* ptr : extra) {
    if (!aligned(ptr)) return "the flash kernels need 16-byte aligned dout/out";
  }
  return {};
}

// Why the sm90 forward cannot take this call; empty when it can.
std::string sm90_why(const AttentionParams& p, KernelDtype dtype, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v) {
#if LONGATTN_WITH_SM90
  if (std::string why = sm90_unsupported(p, dtype); !why.empty()) return why;
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index()));
  if (major != 9 || minor != 0) {
    return "the sm90 kernels run on compute capability 9.0 only (sm_90a code), " + q.device().str() +
           " has " + std::to_string(major) + "." + std::to_string(minor);
  }
  if (std::string why = layout_unsupported("sm90", q, k, v); !why.empty()) return why;
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    for (int64_t d = 0; d < t->dim(); ++d) {
      if (t->size(d) > 1 && t->stride(d) == 0) {
        return std::string("the sm90 kernels' TMA descriptors take no zero strides; ") + name +
               " has strides " + c10::str(t->strides()) + " (an expanded tensor?)";
      }
    }
  }
  return {};
#else
  (void)p, (void)dtype, (void)q, (void)k, (void)v;
  return "this build of longattn has no sm90 kernels (LONGATTN_CUDA_ARCHS named no 9.x "
         "architecture, so nothing was compiled for sm_90a)";
#endif
}

bool choose_flash(const AttentionParams& p, KernelDtype dtype, bool backward, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v,
                  std::initializer_list<const void*> extra) {
  // sm90 is a forward only: its calls' backwards choose as auto does.
  const Backend want = requested_backend() == Backend::kSm90 ? Backend::kAuto : requested_backend();
  if (want == Backend::kSimt) return false;
  // Empty problems (no rows, heads or keys) go to the SIMT kernels, which handle them.
  if (want == Backend::kAuto && (p.total_q == 0 || p.heads_q == 0 || k.numel() == 0)) return false;
  const std::string why = flash_unsupported(p, dtype, backward, q, k, v, extra);
  TORCH_CHECK_VALUE(want != Backend::kFlash || why.empty(),
                    "LONGATTN_CUDA_BACKEND=flash, but ", why, "; unset it (or use simt)");
  return why.empty();
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const AttentionArgs& args) {
  const at::Tensor &q = args.q, &k = args.k, &v = args.v;
  // Checks every tensor is on q's device (index included) before anything touches the GPU.
  // That covers every tensor argument of the op, one of which is on CUDA (the dispatcher
  // picked this kernel from their devices), so q is a CUDA tensor from here on.
  AttentionParams p = make_attention_params(args);
  const c10::cuda::CUDAGuard guard(q.device());
  const ForwardTensors t = make_forward_tensors(args, &p);
  const KernelDtype dt = kernel_dtype_of(q.scalar_type(), "attention", "q");
  const cudaStream_t stream = stream_of(q);
  // Empty problems go to the SIMT kernels as under auto (a TMA descriptor has no empty extent).
  const bool empty = p.total_q == 0 || p.heads_q == 0 || k.numel() == 0;
  if (requested_backend() == Backend::kSm90 && !empty) {
    const std::string why = sm90_why(p, dt, q, k, v);
    TORCH_CHECK_VALUE(why.empty(), "LONGATTN_CUDA_BACKEND=sm90, but ", why, "; unset it (or use flash or simt)");
#if LONGATTN_WITH_SM90
    C10_CUDA_CHECK(sm90_forward(p, dt, stream));
#endif
    return {t.out, t.lse};
  }
  const bool flash = choose_flash(p, dt, /*backward=*/false, q, k, v, {});
  C10_CUDA_CHECK(flash ? flash_forward(p, dt, stream) : simt_forward(p, dt, stream));
  return {t.out, t.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const AttentionArgs& args, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
    const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor &q = args.q, &k = args.k, &v = args.v;
  AttentionParams p = make_attention_params(args);
  // Not implied by make_attention_params: dout, dlse, out and lse are checked only in
  // prepare_backward, below the guard, so a CUDA dout with CPU q/k/v/out/lse gets here.
  TORCH_CHECK_VALUE(q.is_cuda(), "attention_backward: q, k and v are on ", q.device(),
                    " but dout, dlse, out or lse is a CUDA tensor; all must be on one device");
  const c10::cuda::CUDAGuard guard(q.device());
  const BackwardTensors t = prepare_backward(args, &p, dout, out, lse, dlse);
  AttentionGrads g;
  g.dout = t.dout.data_ptr();
  g.dlse = t.dlse_ptr();
  g.dq = t.dq.data_ptr();
  g.dk = t.dk.data_ptr();
  g.dv = t.dv.data_ptr();
  g.dsink = t.dsink_ptr(args);
  g.deterministic = at::globalContext().deterministicAlgorithms();

  const KernelDtype dt = kernel_dtype_of(q.scalar_type(), "attention_backward", "q");
  const bool flash = choose_flash(p, dt, /*backward=*/true, q, k, v, {g.dout, p.out});
  g.workspace_bytes = flash ? flash_backward_workspace(p, dt, g.deterministic)
                            : simt_backward_workspace(p, dt, g.deterministic);
  at::Tensor workspace;
  if (g.workspace_bytes > 0) {
    workspace = at::zeros({static_cast<int64_t>(g.workspace_bytes)}, q.options().dtype(at::kByte));
    g.workspace = workspace.data_ptr();
  }
  const cudaStream_t stream = stream_of(q);
  C10_CUDA_CHECK(flash ? flash_backward(p, g, dt, stream) : simt_backward(p, g, dt, stream));
  return {t.dq, t.dk, t.dv, t.dsink};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("attention", &attention_op<&attention_cuda>);
  m.impl("attention_backward", &attention_backward_op<&attention_backward_cuda>);
}

}  // namespace longattn::cuda
