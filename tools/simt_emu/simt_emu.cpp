// torch.ops.longattn_emu.attention / attention_backward: the SIMT kernels run on the CPU under
// include/cuda_emu.h, with the registration's checks (attention_args.cpp) and the real
// launchers (simt_forward.cuh, simt_backward.cuh: tile plans, launch sequence). Same schemas as
// torch.ops.longattn. Outputs are allocated with NaN guard bands that must survive (no write
// out of bounds). torch.ops.longattn_emu.configure sets the emulated device's `smem_limit` (its
// opt-in shared memory: smaller values force smaller tiles), `seed` (scheduling) and `sms` (its
// multiprocessor count, which sizes decode's split of the keys) for every emulated op, these and
// the others (units/*.cpp).
#include <dlfcn.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention_args.h"
// After torch: the emulation's macros (__shared__, threadIdx, ...) must not reach its headers.
#include "cuda_runtime.h"
#include "cuda/attention/simt/simt_backward.cuh"
#include "cuda/attention/simt/simt_forward.cuh"

namespace {

using namespace longattn;
using namespace longattn::cuda;
using namespace longattn::cuda::simt;

constexpr int64_t kGuard = 64;  // elements of NaN before and after every output

struct Guarded {
  at::Tensor storage, view;
};

bool guard_intact(const at::Tensor& t) {
  return t.is_floating_point() ? t.isnan().all().item<bool>() : t.eq(255).all().item<bool>();
}

// Uninitialized outputs are NaN (0xff bytes for the workspace), so a value nobody wrote shows.
Guarded guarded_empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  Guarded g;
  const bool fp = at::isFloatingType(opt.dtype().toScalarType());
  g.storage = at::full({n + 2 * kGuard}, fp ? std::numeric_limits<double>::quiet_NaN() : 255.0, opt);
  g.view = g.storage.narrow(0, kGuard, n).view(sizes);
  return g;
}

void check_guard(const Guarded& g, const char* name) {
  const int64_t n = g.storage.numel();
  const at::Tensor head = g.storage.narrow(0, 0, kGuard), tail = g.storage.narrow(0, n - kGuard, kGuard);
  TORCH_CHECK(guard_intact(head) && guard_intact(tail),
              "simt_emu: write out of bounds of ", name);
}

void configure(int64_t smem_limit, int64_t seed, int64_t sms) {
  emu::g_device.smem_optin = static_cast<size_t>(smem_limit);
  emu::g_device.seed = static_cast<uint32_t>(seed);
  emu::g_device.sms = static_cast<int>(sms);
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "simt_emu: ", what, " failed to launch (", err, ")");
}

template <typename F>
void dispatch(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "simt_emu: dtype ", st);
  }
}

// The emulated device's shared-memory limit and CTA-order seed are set beforehand (configure).
std::tuple<at::Tensor, at::Tensor> attention_emu(const AttentionArgs& args) {
  const at::Tensor& q = args.q;
  AttentionParams p = make_attention_params(args);
  const Guarded out = guarded_empty(q.sizes(), q.options());
  const Guarded lse = guarded_empty(lse_shape(args), q.options().dtype(lse_dtype(q)));
  p.out = out.view.data_ptr();
  p.lse = lse.view.data_ptr();
  dispatch(q.scalar_type(), [&](auto tag) {
    check_launch(launch_simt_forward<decltype(tag)>(p, nullptr), "the forward");
  });
  check_guard(out, "out");
  check_guard(lse, "lse");
  return {out.view, lse.view};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_emu(
    const AttentionArgs& args, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
    const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor& q = args.q;
  AttentionParams p = make_attention_params(args);
  const BackwardTensors t = prepare_backward(args, &p, dout, out, lse, dlse);
  // The outputs again, with guard bands.
  const Guarded dq = guarded_empty(t.dq.sizes(), t.dq.options());
  const Guarded dk = guarded_empty(t.dk.sizes(), t.dk.options());
  const Guarded dv = guarded_empty(t.dv.sizes(), t.dv.options());
  const Guarded dsink = guarded_empty(t.dsink.sizes(), t.dsink.options());
  AttentionGrads g;
  g.dout = t.dout.data_ptr();
  g.dlse = t.dlse_ptr();
  g.dq = dq.view.data_ptr();
  g.dk = dk.view.data_ptr();
  g.dv = dv.view.data_ptr();
  g.dsink = args.sink_logits ? dsink.view.data_ptr() : nullptr;
  const size_t acc = q.scalar_type() == at::kDouble ? 8 : 4;
  g.workspace_bytes = simt_workspace_bytes(p, acc);
  const Guarded ws = guarded_empty({static_cast<int64_t>(g.workspace_bytes)}, q.options().dtype(at::kByte));
  ws.view.zero_();
  g.workspace = ws.view.data_ptr();
  dispatch(q.scalar_type(), [&](auto tag) {
    check_launch(launch_simt_backward<decltype(tag)>(p, g, nullptr), "the backward");
  });
  check_guard(dq, "dq");
  check_guard(dk, "dk");
  check_guard(dv, "dv");
  check_guard(dsink, "dsink");
  check_guard(ws, "workspace");
  return {dq.view, dk.view, dv.view, dsink.view};
}

// The tiles each pass would use for long sequences (for a coverage report).
std::vector<int64_t> plan(int64_t head_dim, int64_t elem_bytes, int64_t smem_limit) {
  AttentionParams p;
  p.head_dim = head_dim;
  p.seqlen_q = p.seqlen_k = 1 << 20;
  const SimtTiles f = query_major_launch<ForwardSmem>(p, elem_bytes, smem_limit).tiles;
  const SimtTiles q = query_major_launch<DqSmem>(p, elem_bytes, smem_limit).tiles;
  const SimtTiles kv = key_major_launch(p, elem_bytes, smem_limit).tiles;
  return {f.bq, f.bk, q.bq, q.bk, kv.bq, kv.bk};
}

// The kernels launch_kernel ran since the library was loaded: this library's path, each
// kernel's offset in it (nm's address; the kernels are local symbols, dladdr cannot name
// them) and its launch count.
std::tuple<std::string, std::vector<int64_t>, std::vector<int64_t>> launches() {
  Dl_info info{};
  TORCH_CHECK(dladdr(reinterpret_cast<void*>(&launches), &info) != 0, "simt_emu: dladdr failed");
  const auto base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::vector<int64_t> offsets, counts;
  for (const auto& [kernel, n] : emu::g_device.launches) {
    offsets.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(kernel) - base));
    counts.push_back(n);
  }
  return {info.dli_fname, offsets, counts};
}

}  // namespace

TORCH_LIBRARY(longattn_emu, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? alibi_slopes, Tensor? sink_logits, float scale, float softcap, float logn_base, "
      "bool causal, int window_left, int window_right, int sinks, int? q_start, int k_start, "
      "SymInt? max_seqlen_q, SymInt? max_seqlen_k) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? alibi_slopes, "
      "Tensor? sink_logits, float scale, float softcap, float logn_base, bool causal, "
      "int window_left, int window_right, int sinks, int? q_start, int k_start, "
      "SymInt? max_seqlen_q, SymInt? max_seqlen_k) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dsink)");
  m.def("plan(int head_dim, int elem_bytes, int smem_limit) -> int[]", &plan);
  m.def("configure(int smem_limit, int seed, int sms) -> ()", &configure);
  m.def("launches() -> (str library, int[] offsets, int[] counts)", &launches);
}

TORCH_LIBRARY_IMPL(longattn_emu, CPU, m) {
  m.impl("attention", &attention_op<&attention_emu>);
  m.impl("attention_backward", &attention_backward_op<&attention_backward_emu>);
}
