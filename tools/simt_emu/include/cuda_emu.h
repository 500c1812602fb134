// A CPU emulation of the CUDA execution model, just enough to run the SIMT CUDA kernels
// (attention: csrc/cuda/attention/simt/*_kernel*.cuh; rope, merge, KV cache: csrc/cuda/*.cu,
// csrc/cuda/kvcache/*.cu) unmodified on the host, so their indexing, synchronization and
// numerics can be tested against the reference without a GPU.
//
// Each CTA runs as blockDim.x * y * z fibers (at most 1024) on one OS thread (x86-64 only: a
// six-register context switch); thread t of the CTA is (x, y, z) with t = x + X (y + Y z) and
// lane t % 32 of warp t / 32, as on the hardware. A fiber runs until it reaches a barrier:
// __syncthreads (the whole CTA), __syncwarp or a shuffle (the lanes of its mask). The next
// fiber is picked at random among the runnable ones, so a missing barrier shows up as a wrong
// result under some seed. CTAs run one after another in a random order. Errors the hardware
// would leave undefined are reported: a barrier some threads never reach (deadlock), a shuffle
// lane outside its mask, writes past the end of dynamic shared memory. Dynamic shared memory
// starts as NaN bytes, so reading what nobody wrote poisons the result. (Static __shared__
// variables are function statics: shared by every CTA, not poisoned.) cp.async copies land in
// shared memory only at the cp_async_wait that completes their group, so a read before it sees
// the old bytes; a thread that exits with copies still pending is an error.
//
// Under AddressSanitizer (emu_ops.py, SIMT_EMU_ASAN=1) dynamic shared memory is allocated at its
// exact size without the guard band, so ASan reports reads and writes past its end as it does
// for global memory (torch's tensors) and static __shared__ arrays; the fiber switches are
// announced to ASan so its reports show the kernel's stack.
//
// cuda_runtime.h (the stand-in) adds the runtime calls the launchers make, and launch_kernel,
// the emulated counterpart of device_common.cuh's: it checks the launch configuration as the
// driver would and runs the grid here.
#pragma once
#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LONGATTN_EMU_ASAN 1
#else
#define LONGATTN_EMU_ASAN 0
#define ASAN_UNPOISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // CTAs run one after another: a static is per-CTA shared memory
#define __align__(n) alignas(n)
#ifndef LONGATTN_SIMT_EMULATION
#define LONGATTN_SIMT_EMULATION 1
#endif

using std::fma;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// emu_swap(&save, load): saves the callee-saved registers and the stack pointer into *save and
// resumes the context whose stack pointer is load. Weak: every translation unit that includes
// this header emits it, the linker keeps one.
extern "C" void emu_swap(void** save, void* load);
asm(R"(
  .text
  .weak emu_swap
  .type emu_swap, @function
emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_swap, .-emu_swap
)");

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "simt_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

struct Barrier {
  int expected = 0;
  std::vector<int> waiting;  // fibers parked here
  uint64_t gen = 0;          // completed rounds
};

// The lanes of one warp named by one mask: their barrier and their shuffle slots. Two slot sets
// alternate by round, so a shuffle needs one barrier: a lane can only write a set again two
// rounds later, after every lane has passed the round between, i.e. has read.
struct Group {
  Barrier bar;
  alignas(16) unsigned char slots[2][32][8];
};

struct Fiber {
  void* sp = nullptr;
  bool done = false;
};

// A thread's cp.async copies: the open group, then the committed ones, oldest first.
struct AsyncCopy {
  void* dst;
  const void* src;  // null: zero fill
  int bytes;
};
struct AsyncQueue {
  std::vector<AsyncCopy> open;
  std::vector<std::vector<AsyncCopy>> groups;
};

constexpr int kMaxBlockThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
// ASan's redzone replaces the guard band.
constexpr size_t kGuardBytes = LONGATTN_EMU_ASAN ? 0 : 256;

struct Cta {
  int threads = 0;
  std::vector<Fiber> fibers;
  void* sched_sp = nullptr;
  int cur = 0;
  int done = 0;
  std::vector<int> ready;  // runnable fibers other than the current one
  Barrier block;
  std::map<std::pair<int, unsigned>, Group> groups;  // (warp, lane mask)
  std::map<uint64_t, int> votes;  // __syncthreads_or: the OR of each barrier round's votes
  std::vector<AsyncQueue> async;  // per fiber
  std::vector<unsigned char> smem;  // dynamic shared memory + a guard band
  size_t smem_bytes = 0;
  const std::function<void()>* body = nullptr;
  // The scheduler's stack, for ASan's fiber-switch annotations (learnt on the first switch).
  const void* sched_stack = nullptr;
  size_t sched_stack_bytes = 0;
};

inline Cta* g_cta = nullptr;
inline dim3 g_tid, g_bid, g_block, g_grid;
inline std::vector<char> g_stacks;

inline int lane() { return g_cta->cur & 31; }

// emu_swap from the running fiber to the scheduler; `exiting`: the fiber will never resume.
inline void to_scheduler(bool exiting) {
  Cta& c = *g_cta;
#if LONGATTN_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack, c.sched_stack,
                                 c.sched_stack_bytes);
  emu_swap(&c.fibers[c.cur].sp, c.sched_sp);
  __sanitizer_finish_switch_fiber(fake_stack, &g_cta->sched_stack, &g_cta->sched_stack_bytes);
#else
  (void)exiting;
  emu_swap(&c.fibers[c.cur].sp, c.sched_sp);
#endif
}

// emu_swap from the scheduler to fiber t.
inline void to_fiber(int t) {
  Cta& c = *g_cta;
#if LONGATTN_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, g_stacks.data() + t * kStackBytes, kStackBytes);
  emu_swap(&c.sched_sp, c.fibers[t].sp);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  emu_swap(&c.sched_sp, c.fibers[t].sp);
#endif
}

inline void wait_on(Barrier& b) {
  Cta& c = *g_cta;
  if (static_cast<int>(b.waiting.size()) + 1 == b.expected) {  // the last to arrive
    c.ready.insert(c.ready.end(), b.waiting.begin(), b.waiting.end());
    b.waiting.clear();
    ++b.gen;
    return;
  }
  b.waiting.push_back(c.cur);
  to_scheduler(false);
}

inline Group& group(unsigned mask) {
  Cta& c = *g_cta;
  const int warp = c.cur / 32;
  auto it = c.groups.find({warp, mask});
  if (it == c.groups.end()) {
    it = c.groups.emplace(std::make_pair(warp, mask), Group{}).first;
    it->second.bar.expected = __builtin_popcount(mask);
  }
  return it->second;
}

[[noreturn]] inline void fiber_entry() {
#if LONGATTN_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_cta->sched_stack, &g_cta->sched_stack_bytes);
#endif
  Cta& c = *g_cta;
  (*c.body)();
  const AsyncQueue& aq = c.async[c.cur];
  if (!aq.open.empty() || !aq.groups.empty()) fail("a thread exited with cp.async copies pending");
  c.fibers[c.cur].done = true;
  ++c.done;
  to_scheduler(true);
  fail("a finished fiber was resumed");
}

// Runs body as the CTA at `block` of g_block's shape with smem_bytes of dynamic shared memory.
inline void run_cta(dim3 block, size_t smem_bytes, const std::function<void()>& body,
                    std::mt19937& rng) {
  const int threads = static_cast<int>(g_block.x * g_block.y * g_block.z);
  Cta* cta = new Cta;
  Cta& c = *cta;
  g_cta = cta;
  c.threads = threads;
  c.fibers.resize(threads);
  c.async.resize(threads);
  c.block.expected = threads;
  c.body = &body;
  c.smem_bytes = smem_bytes;
  c.smem.assign(smem_bytes + kGuardBytes, 0xff);  // 0xff..: NaN as fp32 and fp64
  if (g_stacks.size() < kStackBytes * threads) g_stacks.assign(kStackBytes * threads, 0);
  // The frames a finished fiber left (it never returned from fiber_entry) are still poisoned.
  ASAN_UNPOISON_MEMORY_REGION(g_stacks.data(), kStackBytes * threads);
  for (int t = 0; t < threads; ++t) {
    // A fresh stack that emu_swap "returns" into fiber_entry from: six zero registers, the
    // entry address, and a dummy return address so the entry sees an ABI-aligned stack.
    auto* top = reinterpret_cast<void**>(g_stacks.data() + (t + 1) * kStackBytes);
    top[-1] = nullptr;
    top[-2] = reinterpret_cast<void*>(&fiber_entry);
    for (int r = 3; r <= 8; ++r) top[-r] = nullptr;
    c.fibers[t].sp = top - 8;
  }
  for (int t = 0; t < threads; ++t) c.ready.push_back(t);
  g_bid = block;
  while (c.done < threads) {
    if (c.ready.empty()) {
      std::fprintf(stderr, "simt_emu: deadlock in block (%u, %u, %u): %d threads exited, the others wait\n",
                   block.x, block.y, block.z, c.done);
      fail("a barrier or shuffle some threads of its group never reach");
    }
    // Resume a random runnable fiber: it runs until it blocks at a barrier or exits.
    const size_t i = std::uniform_int_distribution<size_t>(0, c.ready.size() - 1)(rng);
    const int t = c.ready[i];
    c.ready[i] = c.ready.back();
    c.ready.pop_back();
    c.cur = t;
    g_tid = dim3(t % g_block.x, (t / g_block.x) % g_block.y, t / (g_block.x * g_block.y));
    to_fiber(t);
  }
  for (size_t i = smem_bytes; i < c.smem.size(); ++i) {
    if (c.smem[i] != 0xff) fail("write past the end of dynamic shared memory");
  }
  g_cta = nullptr;
  delete cta;
}

// A grid of CTAs of `block` threads, in a random order (as the hardware may schedule them).
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body,
                   uint32_t seed) {
  const int64_t threads = int64_t{block.x} * block.y * block.z;
  if (threads < 1 || threads > kMaxBlockThreads) fail("a block of 0 or more than 1024 threads");
  std::mt19937 rng(seed);
  std::vector<dim3> order;
  order.reserve(int64_t{grid.x} * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
    }
  }
  std::shuffle(order.begin(), order.end(), rng);
  g_grid = grid;
  g_block = block;
  for (const dim3& b : order) run_cta(b, smem_bytes, body, rng);
}

// A 1-D grid of `blocks` CTAs of 256 threads.
inline void launch(int64_t blocks, size_t smem_bytes, const std::function<void()>& body,
                   uint32_t seed) {
  launch(dim3(static_cast<unsigned>(blocks)), dim3(256), smem_bytes, body, seed);
}

}  // namespace emu

#define threadIdx (::emu::g_tid)
#define blockIdx (::emu::g_bid)
#define blockDim (::emu::g_block)
#define gridDim (::emu::g_grid)

inline void __syncthreads() { emu::wait_on(emu::g_cta->block); }
// A round's votes are read right after its barrier, so by the time any thread reaches round
// r + 2 every thread has read round r's: it is dropped then.
inline int __syncthreads_or(int pred) {
  emu::Cta& cta = *emu::g_cta;
  const uint64_t round = cta.block.gen;
  if (round >= 2) cta.votes.erase(round - 2);
  int& vote = cta.votes[round];
  vote |= pred != 0;
  emu::wait_on(cta.block);
  return cta.votes[round];
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (!((mask >> emu::lane()) & 1)) emu::fail("__syncwarp: calling lane not in mask");
  emu::wait_on(emu::group(mask).bar);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int lane = emu::lane(), src = lane ^ lane_mask;
  if (!((mask >> lane) & 1)) emu::fail("__shfl_xor_sync: calling lane not in mask");
  if (src > 31 || !((mask >> src) & 1)) emu::fail("__shfl_xor_sync: source lane not in mask");
  emu::Group& grp = emu::group(mask);
  const int set = static_cast<int>(grp.bar.gen & 1);
  std::memcpy(grp.slots[set][lane], &v, sizeof(T));
  emu::wait_on(grp.bar);  // every lane of the mask has published its value
  T r;
  std::memcpy(&r, grp.slots[set][src], sizeof(T));
  return r;
}

inline int __any_sync(unsigned mask, int pred) {
  const int lane = emu::lane();
  if (!((mask >> lane) & 1)) emu::fail("__any_sync: calling lane not in mask");
  emu::Group& grp = emu::group(mask);
  const int set = static_cast<int>(grp.bar.gen & 1);
  grp.slots[set][lane][0] = pred != 0;
  emu::wait_on(grp.bar);  // every lane of the mask has published its vote
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= ((mask >> l) & 1) ? grp.slots[set][l][0] : 0;
  return any;
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  const int lane = emu::lane();
  if (!((mask >> lane) & 1)) emu::fail("__ballot_sync: calling lane not in mask");
  emu::Group& grp = emu::group(mask);
  const int set = static_cast<int>(grp.bar.gen & 1);
  grp.slots[set][lane][0] = pred != 0;
  emu::wait_on(grp.bar);  // every lane of the mask has published its vote
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (((mask >> l) & 1) && grp.slots[set][l][0]) ? 1u << l : 0u;
  return bits;
}

inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz(static_cast<unsigned>(x)) + 1; }

// Fibers switch only at barriers, so a read-modify-write is atomic as it stands.
inline int atomicAdd(int* address, int v) {
  const int old = *address;
  *address = old + v;
  return old;
}
inline unsigned atomicAdd(unsigned* address, unsigned v) {
  const unsigned old = *address;
  *address = old + v;
  return old;
}
inline int atomicMin(int* address, int v) {
  const int old = *address;
  *address = std::min(old, v);
  return old;
}
inline int atomicExch(int* address, int v) {
  const int old = *address;
  *address = v;
  return old;
}

// CTAs run one after another: a CTA sees every write of the CTAs before it.
inline void __threadfence() {}

template <typename A>
inline A* dynamic_smem() {
  return reinterpret_cast<A*>(emu::g_cta->smem.data());
}

// device_common.cuh's cp.async, deferred to the wait that completes the copy's group.
template <int Bytes>
inline void cp_async(void* smem, const void* gmem, bool valid) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(smem) % Bytes != 0 ||
      (valid && reinterpret_cast<uintptr_t>(gmem) % Bytes != 0)) {
    emu::fail("cp.async: misaligned address");
  }
  emu::g_cta->async[emu::g_cta->cur].open.push_back({smem, valid ? gmem : nullptr, Bytes});
}
inline void cp_async_commit() {
  emu::AsyncQueue& q = emu::g_cta->async[emu::g_cta->cur];
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}
template <int N>
inline void cp_async_wait() {
  emu::AsyncQueue& q = emu::g_cta->async[emu::g_cta->cur];
  while (static_cast<int>(q.groups.size()) > N) {
    for (const emu::AsyncCopy& c : q.groups.front()) {
      if (c.src != nullptr) {
        std::memcpy(c.dst, c.src, c.bytes);
      } else {
        std::memset(c.dst, 0, c.bytes);
      }
    }
    q.groups.erase(q.groups.begin());
  }
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
