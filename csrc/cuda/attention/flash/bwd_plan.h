// The host side of one flash backward call, shared by the CUDA launcher (bwd_launch.h) and the
// host emulator (tools/flash_emu): kernel parameters from the contract's structs, and which
// kernels run on which grids.
#pragma once
#include <cuda_runtime_api.h>

#include "cuda/attention/attention_launch.h"
#include "cuda/attention/flash/bwd_params.h"
#include "cuda/attention/flash/bwd_preprocess.h"

namespace longattn::cuda::flash {

inline BwdParams make_bwd_params(const AttentionParams& p, const AttentionGrads& g) {
  BwdParams bp;
  bp.p = p;
  bp.dout = g.dout;
  bp.dlse = g.dlse;
  bp.dq = g.dq;
  bp.dk = g.dk;
  bp.dv = g.dv;
  bp.dsink = g.dsink;
  bp.scale = static_cast<float>(p.score.scale);
  if (p.score.softcap > 0.0) {
    bp.softcap = static_cast<float>(p.score.softcap);
    bp.inv_softcap = static_cast<float>(1.0 / p.score.softcap);
  }
  bp.rows_q = q_rows(p);
  const BwdWorkspace w = bwd_workspace(p, g.deterministic);
  char* ws = static_cast<char*>(g.workspace);
  bp.delta = reinterpret_cast<float*>(ws);
  bp.dq_accum = g.deterministic ? nullptr : reinterpret_cast<float*>(ws + w.dq_accum_offset);
  return bp;
}

struct Grid3 {
  int64_t x = 0, y = 1, z = 1;
  bool empty() const { return x <= 0 || y <= 0 || z <= 0; }
};

// Kernels in launch order; an empty grid is not launched.
struct BwdPlan {
  Grid3 delta;    // DeltaKernel: (row, head) items
  Grid3 dsink;    // DsinkKernel: one block per q head
  Grid3 dkdv;     // dkdv_block: (key block, kv head, sequence)
  Grid3 dq;       // dq_block (deterministic): (query block, q head, sequence)
  Grid3 convert;  // ConvertDqKernel (default)
  bool softcap = false;
};

template <class Kt>
BwdPlan bwd_plan(const BwdParams& bp, bool deterministic) {
  const AttentionParams& p = bp.p;
  BwdPlan plan;
  const int64_t q_items = bp.rows_q * p.heads_q;
  plan.delta.x = ceil_div(q_items, DeltaKernel<typename Kt::Ops, typename Kt::Elem, Kt::kHeadDim>::kRowsPerBlock);
  // dsink is written for every head, also without any query row (it is then 0).
  plan.dsink.x = bp.dsink != nullptr ? p.heads_q : 0;
  plan.dkdv = {ceil_div(p.seqlen_k, Kt::kBlockN), p.heads_kv, p.batch};
  if (q_items > 0) {
    if (deterministic) {
      plan.dq = {ceil_div(p.seqlen_q, Kt::kBlockM), p.heads_q, p.batch};
    } else {
      plan.convert.x = ceil_div(q_items * Kt::kHeadDim / 8, int64_t(ConvertDqKernel<typename Kt::Elem>::kThreads));
    }
  }
  plan.softcap = p.score.softcap > 0.0;
  return plan;
}

// Arguments the kernels cannot take: the wrong head dim, a short workspace, grids past the
// hardware limits (y, z < 65536).
template <class Kt>
cudaError_t bwd_check(const AttentionParams& p, const AttentionGrads& g) {
  if (p.head_dim != Kt::kHeadDim) return cudaErrorInvalidValue;
  if (g.workspace_bytes < bwd_workspace(p, g.deterministic).total) return cudaErrorInvalidValue;
  if (p.batch > 65535 || p.heads_q > 65535 || p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) {
    return cudaErrorInvalidConfiguration;
  }
  return cudaSuccess;
}

}  // namespace longattn::cuda::flash
