// Host emulation of the flash attention backward (csrc/cuda/attention/flash/bwd_*): the same
// kernel bodies, grids and launch plan as the CUDA build, run on emulated threads (see
// emu_runtime.h). Built and driven by tests/test_flash_emu.py through a C entry point.
#include "emu_host.h"

#include "cuda/attention/flash/bwd_configs.h"
#include "cuda/attention/flash/bwd_dkdv_kernel.h"
#include "cuda/attention/flash/bwd_dq_kernel.h"
#include "cuda/attention/flash/bwd_plan.h"

using namespace longattn;
using namespace longattn::cuda;
using namespace longattn::cuda::flash;
using emu::to_params;

namespace {

AttentionGrads to_grads(const EmuArgs& a) {
  AttentionGrads g;
  g.dout = a.dout;
  g.dlse = a.dlse;
  g.dq = a.dq;
  g.dk = a.dk;
  g.dv = a.dv;
  g.dsink = a.dsink;
  g.workspace = a.workspace;
  g.workspace_bytes = a.workspace_bytes;
  g.deterministic = a.deterministic != 0;
  return g;
}

template <class Kt>
void run_emulated(const EmuArgs& a) {
  using Elem = typename Kt::Elem;
  constexpr int D = Kt::kHeadDim;
  using Ops = emu::EmuOps;
  const AttentionParams p = to_params(a);
  const AttentionGrads g = to_grads(a);
  if (bwd_check<Kt>(p, g) != cudaSuccess) emu::fail("bwd_check rejected the arguments");
  const BwdParams bp = make_bwd_params(p, g);
  const BwdPlan plan = bwd_plan<Kt>(bp, g.deterministic);

  emu::Launcher launcher(a);
  auto launch = [&](const Grid3& grid, int threads, size_t smem_bytes, auto&& body) {
    launcher(grid.x, grid.y, grid.z, threads, smem_bytes, body);
  };

  launch(plan.delta, DeltaKernel<Ops, Elem, D>::kThreads, 0,
         [&](int64_t x, int64_t, int64_t, int tid, char*) { DeltaKernel<Ops, Elem, D>::run(bp, x, tid); });
  launch(plan.dsink, DsinkKernel<Ops>::kThreads, DsinkKernel<Ops>::kThreads * sizeof(float),
         [&](int64_t x, int64_t, int64_t, int tid, char* smem) {
           DsinkKernel<Ops>::run(bp, reinterpret_cast<float*>(smem), int(x), tid);
         });
  launch(plan.dkdv, Kt::kNThreads, Kt::kSmemDkdv, [&](int64_t x, int64_t y, int64_t z, int tid, char* smem) {
    if (plan.softcap) {
      dkdv_block<Kt, true>(bp, smem, int(x), int(y), int(z), tid);
    } else {
      dkdv_block<Kt, false>(bp, smem, int(x), int(y), int(z), tid);
    }
  });
  launch(plan.dq, Kt::kNThreads, Kt::kSmemDq, [&](int64_t x, int64_t y, int64_t z, int tid, char* smem) {
    if (plan.softcap) {
      dq_block<Kt, true>(bp, smem, int(x), int(y), int(z), tid);
    } else {
      dq_block<Kt, false>(bp, smem, int(x), int(y), int(z), tid);
    }
  });
  launch(plan.convert, ConvertDqKernel<Elem>::kThreads, 0,
         [&](int64_t x, int64_t, int64_t, int tid, char*) { ConvertDqKernel<Elem>::run(bp, x, tid); });
}

template <class Elem>
void dispatch_hdim(const EmuArgs& a) {
  if (a.head_dim == 64) return run_emulated<typename BwdConfig<Elem, 64, false, emu::EmuOps>::Traits>(a);
  if (a.head_dim == 96) return run_emulated<typename BwdConfig<Elem, 96, false, emu::EmuOps>::Traits>(a);
  if (a.head_dim == 256) return run_emulated<typename BwdConfig<Elem, 256, false, emu::EmuOps>::Traits>(a);
  if (a.head_dim != 128) emu::fail("head dim must be 64, 96, 128 or 256");
  if (a.narrow) return run_emulated<typename BwdConfig<Elem, 128, true, emu::EmuOps>::Traits>(a);
  return run_emulated<typename BwdConfig<Elem, 128, false, emu::EmuOps>::Traits>(a);
}

}  // namespace

extern "C" {

uint64_t emu_flash_bwd_workspace(const EmuArgs* a) {
  return bwd_workspace(to_params(*a), a->deterministic != 0).total;
}

// 0 on success; otherwise the message is copied into err.
int emu_flash_bwd(const EmuArgs* a, char* err, int err_len) {
  try {
    if (a->dtype == 0) {
      dispatch_hdim<cutlass::half_t>(*a);
    } else {
      dispatch_hdim<cutlass::bfloat16_t>(*a);
    }
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
}

}  // extern "C"
