// A CPU emulation of the CUDA execution model, just enough to run the SIMT attention kernels
// (csrc/cuda/attention/simt/*_kernel*.cuh) unmodified on the host, so their indexing,
// synchronization and numerics can be tested against the reference without a GPU.
//
// Each CTA runs as 256 fibers on one OS thread (x86-64 only: a six-register context switch). A fiber runs until it reaches a
// barrier: __syncthreads (all 256), __syncwarp or a shuffle (the lanes of its mask). The next
// fiber is picked at random among the runnable ones, so a missing barrier shows up as a wrong
// result under some seed. Errors the hardware would leave undefined are reported: a barrier
// some threads never reach (deadlock), a shuffle lane outside its mask, writes past the end of
// shared memory. Shared memory starts as NaN bytes, so reading what nobody wrote poisons the
// result.
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

// emu_swap(&save, load): saves the callee-saved registers and the stack pointer into *save and
// resumes the context whose stack pointer is load.
extern "C" void emu_swap(void** save, void* load);
asm(R"(
  .text
  .globl emu_swap
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

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

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

constexpr int kBlockThreads = 256;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;

struct Cta {
  Fiber fibers[kBlockThreads];
  void* sched_sp = nullptr;
  int cur = 0;
  int done = 0;
  std::vector<int> ready;  // runnable fibers other than the current one
  Barrier block{kBlockThreads, {}};
  std::map<std::pair<int, unsigned>, Group> groups;  // (warp, lane mask)
  std::vector<unsigned char> smem;  // dynamic shared memory + a guard band
  size_t smem_bytes = 0;
  const std::function<void()>* body = nullptr;
};

inline Cta* g_cta = nullptr;
inline Dim3 g_tid, g_bid;
inline std::vector<char> g_stacks;

inline void wait_on(Barrier& b) {
  Cta& c = *g_cta;
  if (static_cast<int>(b.waiting.size()) + 1 == b.expected) {  // the last to arrive
    c.ready.insert(c.ready.end(), b.waiting.begin(), b.waiting.end());
    b.waiting.clear();
    ++b.gen;
    return;
  }
  b.waiting.push_back(c.cur);
  emu_swap(&c.fibers[c.cur].sp, c.sched_sp);
}

inline Group& group(unsigned mask) {
  Cta& c = *g_cta;
  const int warp = static_cast<int>(g_tid.x / 32);
  auto it = c.groups.find({warp, mask});
  if (it == c.groups.end()) {
    it = c.groups.emplace(std::make_pair(warp, mask), Group{}).first;
    it->second.bar.expected = __builtin_popcount(mask);
  }
  return it->second;
}

[[noreturn]] inline void fiber_entry() {
  Cta& c = *g_cta;
  (*c.body)();
  c.fibers[c.cur].done = true;
  ++c.done;
  emu_swap(&c.fibers[c.cur].sp, c.sched_sp);
  fail("a finished fiber was resumed");
}

// Runs body as CTA `block` of 256 threads with smem_bytes of dynamic shared memory.
inline void run_cta(unsigned block, size_t smem_bytes, const std::function<void()>& body,
                    std::mt19937& rng) {
  Cta* cta = new Cta;
  Cta& c = *cta;
  g_cta = cta;
  c.body = &body;
  c.smem_bytes = smem_bytes;
  c.smem.assign(smem_bytes + kGuardBytes, 0xff);  // 0xff..: NaN as fp32 and fp64
  if (g_stacks.size() < kStackBytes * kBlockThreads) g_stacks.assign(kStackBytes * kBlockThreads, 0);
  for (int t = 0; t < kBlockThreads; ++t) {
    // A fresh stack that emu_swap "returns" into fiber_entry from: six zero registers, the
    // entry address, and a dummy return address so the entry sees an ABI-aligned stack.
    auto* top = reinterpret_cast<void**>(g_stacks.data() + (t + 1) * kStackBytes);
    top[-1] = nullptr;
    top[-2] = reinterpret_cast<void*>(&fiber_entry);
    for (int r = 3; r <= 8; ++r) top[-r] = nullptr;
    c.fibers[t].sp = top - 8;
  }
  for (int t = 0; t < kBlockThreads; ++t) c.ready.push_back(t);
  while (c.done < kBlockThreads) {
    if (c.ready.empty()) {
      std::fprintf(stderr, "simt_emu: deadlock in block %u: %d threads exited, the others wait\n",
                   block, c.done);
      fail("a barrier or shuffle some threads of its group never reach");
    }
    // Resume a random runnable fiber: it runs until it blocks at a barrier or exits.
    const size_t i = std::uniform_int_distribution<size_t>(0, c.ready.size() - 1)(rng);
    const int t = c.ready[i];
    c.ready[i] = c.ready.back();
    c.ready.pop_back();
    c.cur = t;
    g_tid.x = static_cast<unsigned>(t);
    g_bid.x = block;
    emu_swap(&c.sched_sp, c.fibers[t].sp);
  }
  for (size_t i = smem_bytes; i < c.smem.size(); ++i) {
    if (c.smem[i] != 0xff) fail("write past the end of dynamic shared memory");
  }
  g_cta = nullptr;
  delete cta;
}

// A grid of `blocks` CTAs, in a random order (as the hardware may schedule them).
inline void launch(int64_t blocks, size_t smem_bytes, const std::function<void()>& body,
                   uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<unsigned> order(blocks);
  for (int64_t b = 0; b < blocks; ++b) order[b] = static_cast<unsigned>(b);
  std::shuffle(order.begin(), order.end(), rng);
  for (unsigned b : order) run_cta(b, smem_bytes, body, rng);
}

}  // namespace emu

#define threadIdx (::emu::g_tid)
#define blockIdx (::emu::g_bid)

inline void __syncthreads() { emu::wait_on(emu::g_cta->block); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (!((mask >> (threadIdx.x & 31)) & 1)) emu::fail("__syncwarp: calling lane not in mask");
  emu::wait_on(emu::group(mask).bar);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int lane = threadIdx.x & 31, src = lane ^ lane_mask;
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

template <typename A>
inline A* dynamic_smem() {
  return reinterpret_cast<A*>(emu::g_cta->smem.data());
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
