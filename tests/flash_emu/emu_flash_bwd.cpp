// Host emulation of the flash attention backward (csrc/cuda/attention/flash/bwd_*): the same
// kernel bodies, grids and launch plan as the CUDA build, run on emulated threads (see
// emu_runtime.h). Built and driven by tests/test_flash_emu.py through a C entry point.
#include <cstdlib>
#include <cstring>

#include "emu_runtime.h"

#include "cuda/attention/flash/bwd_configs.h"
#include "cuda/attention/flash/bwd_dkdv_kernel.h"
#include "cuda/attention/flash/bwd_dq_kernel.h"
#include "cuda/attention/flash/bwd_plan.h"

namespace emu {

static Block* g_block = nullptr;
Block& current_block() { return *g_block; }

constexpr size_t kStackBytes = 512 * 1024;

void fiber_entry() {
  Block& b = *g_block;
  const int id = b.current_;
  try {
    (*b.body_)(id);
  } catch (const std::exception& e) {
    if (b.error_.empty()) b.error_ = e.what();
  }
  b.fibers_[id].finished = true;
  _longjmp(b.sched_jb_, 1);
}

void Block::yield() {
  Fiber& f = fibers_[current_];
  if (_setjmp(f.jb) == 0) _longjmp(sched_jb_, 1);
}

void Block::wait(Barrier& b) {
  const uint64_t gen = b.gen;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.gen;
    yield();  // let the scheduler decide who goes first
    return;
  }
  Fiber& f = fibers_[current_];
  f.wait_on = &b;
  f.wait_gen = gen;
  yield();
  fibers_[current_].wait_on = nullptr;
}

void Block::sync() {
  const uint64_t gen = block_barrier_.gen;
  wait(block_barrier_);
  (void)gen;
}

void Block::warp_sync() { wait(warp_barriers_[current_ / 32]); }

void Block::run(int threads, uint64_t seed, int policy, const std::function<void(int)>& body) {
  if (threads % 32 != 0) fail("block size must be a multiple of 32");
  fibers_.clear();
  fibers_.resize(threads);
  warp_barriers_.assign(threads / 32, Barrier{32, 0, 0});
  slots_.assign(threads / 32, WarpSlot{});
  block_barrier_ = Barrier{threads, 0, 0};
  warp_priority_.resize(threads / 32);
  for (int w = 0; w < threads / 32; ++w) warp_priority_[w] = w;
  rng_.seed(seed);
  std::shuffle(warp_priority_.begin(), warp_priority_.end(), rng_);
  policy_ = policy;
  body_ = &body;
  error_.clear();
  g_block = this;
  for (Fiber& f : fibers_) {
    f.stack.resize(kStackBytes);
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack.data();
    f.uc.uc_stack.ss_size = f.stack.size();
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_entry, 0);
  }
  last_block_gen_ = 0;
  _setjmp(sched_jb_);  // every fiber switch comes back here; only plain locals below
  const int pick = pick_next();
  if (pick < 0) {
    g_block = nullptr;
    return;
  }
  current_ = pick;
  Fiber& f = fibers_[pick];
  if (!f.started) {
    f.started = true;
    setcontext(&f.uc);
  }
  _longjmp(f.jb, 1);
}

int Block::pick_next() {
  if (!error_.empty()) fail(error_);
  if ((policy_ & 1) && block_barrier_.gen != last_block_gen_) {
    // A new phase between two __syncthreads: a new warp order.
    last_block_gen_ = block_barrier_.gen;
    std::shuffle(warp_priority_.begin(), warp_priority_.end(), rng_);
  }
  cand_.clear();
  bool all_done = true;
  for (int i = 0; i < static_cast<int>(fibers_.size()); ++i) {
    all_done = all_done && fibers_[i].finished;
    if (runnable(fibers_[i])) cand_.push_back(i);
  }
  if (all_done) return -1;
  if (cand_.empty()) fail("deadlock: threads wait at barriers that can never complete");
  if ((policy_ & 1)) {
    // Only the runnable fibers of the highest-priority warp that has any.
    for (int w : warp_priority_) {
      size_t n = 0;
      for (int i : cand_) {
        if (i / 32 == w) cand_[n++] = i;
      }
      if (n > 0) {
        cand_.resize(n);
        break;
      }
    }
  }
  return cand_[std::uniform_int_distribution<size_t>(0, cand_.size() - 1)(rng_)];
}

}  // namespace emu

using namespace longattn;
using namespace longattn::cuda;
using namespace longattn::cuda::flash;

extern "C" {

// Mirrored by tests/test_flash_emu.py (ctypes).
struct EmuArgs {
  int32_t dtype;  // 0 fp16, 1 bf16
  int32_t head_dim;
  int32_t deterministic;
  int32_t narrow;  // the 64-key hd128 configuration
  int32_t policy;  // bit 1: one warp at a time in random warp order (else random fibers);
                   // bits 2 / 4: cp.async lands at issue / at random (else at the wait)
  int32_t causal;
  int32_t q_start_default;
  int32_t pad;
  uint64_t seed;
  const void *q, *k, *v, *out, *lse, *dout, *dlse;
  void *dq, *dk, *dv, *dsink, *workspace;
  uint64_t workspace_bytes;
  int64_t q_strides[3], k_strides[3], v_strides[3];  // batch, row, head (elements)
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, total_q;
  const int32_t *cu_q, *cu_k;
  const float *alibi, *sink_logits;
  int64_t q_start, k_start, left, right, sinks;
  double scale, softcap, inv_log_logn_base;
  int64_t n_ranges;
  const uint64_t* ranges;  // (address, bytes) pairs of every buffer cp.async may read
};

}  // extern "C"

namespace {

AttentionParams to_params(const EmuArgs& a) {
  AttentionParams p;
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.q_batch_stride = a.q_strides[0];
  p.q_row_stride = a.q_strides[1];
  p.q_head_stride = a.q_strides[2];
  p.k_batch_stride = a.k_strides[0];
  p.k_row_stride = a.k_strides[1];
  p.k_head_stride = a.k_strides[2];
  p.v_batch_stride = a.v_strides[0];
  p.v_row_stride = a.v_strides[1];
  p.v_head_stride = a.v_strides[2];
  p.out = const_cast<void*>(a.out);
  p.lse = const_cast<void*>(a.lse);
  p.batch = a.batch;
  p.heads_q = a.heads_q;
  p.heads_kv = a.heads_kv;
  p.head_dim = a.head_dim;
  p.seqlen_q = a.seqlen_q;
  p.seqlen_k = a.seqlen_k;
  p.total_q = a.total_q;
  p.cu_seqlens_q = a.cu_q;
  p.cu_seqlens_k = a.cu_k;
  p.alibi_slopes = a.alibi;
  p.sink_logits = a.sink_logits;
  p.mask.q_start = a.q_start;
  p.mask.k_start = a.k_start;
  p.mask.left = a.left;
  p.mask.right = a.right;
  p.mask.sinks = a.sinks;
  p.mask.causal = a.causal != 0;
  p.q_start_default = a.q_start_default != 0;
  p.score.scale = a.scale;
  p.score.softcap = a.softcap;
  p.score.inv_log_logn_base = a.inv_log_logn_base;
  p.score.has_alibi = a.alibi != nullptr;
  p.score.has_sink_logit = a.sink_logits != nullptr;
  return p;
}

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

// Shared memory of one block: NaN-filled (0xff) so reads of never-written smem poison the
// results, with a guard band checked after the block.
struct Smem {
  static constexpr size_t kGuard = 4096;
  char* base = nullptr;
  size_t bytes = 0;
  explicit Smem(size_t n) : bytes(n) {
    base = static_cast<char*>(std::aligned_alloc(128, (n + kGuard + 127) / 128 * 128));
  }
  ~Smem() { std::free(base); }
  void reset() { std::memset(base, 0xff, bytes + kGuard); }
  void check() const {
    for (size_t i = bytes; i < bytes + kGuard; ++i) {
      if (static_cast<unsigned char>(base[i]) != 0xff) emu::fail("shared memory written past its size");
    }
  }
};

uint64_t mix(uint64_t seed, int64_t x, int64_t y, int64_t z) {
  uint64_t h = seed ^ 0x9e3779b97f4a7c15ull;
  for (int64_t v : {x, y, z}) h = (h ^ uint64_t(v)) * 0xbf58476d1ce4e5b9ull + 0x94d049bb133111ebull;
  return h;
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

  emu::Block blk;
  for (int64_t i = 0; i < a.n_ranges; ++i) {
    blk.global_ranges.push_back({uintptr_t(a.ranges[2 * i]), uintptr_t(a.ranges[2 * i] + a.ranges[2 * i + 1])});
  }
  auto launch = [&](const Grid3& grid, int threads, size_t smem_bytes, auto&& body) {
    if (grid.empty()) return;
    Smem smem(smem_bytes);
    for (int64_t z = 0; z < grid.z; ++z) {
      for (int64_t y = 0; y < grid.y; ++y) {
        for (int64_t x = 0; x < grid.x; ++x) {
          smem.reset();
          blk.run(threads, mix(a.seed, x, y, z), a.policy,
                  [&](int tid) { body(x, y, z, tid, smem.base); });
          smem.check();
        }
      }
    }
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
  if (a.head_dim != 128) emu::fail("head dim must be 64 or 128");
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
