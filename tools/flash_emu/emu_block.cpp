// The emulator's thread scheduler (emu_runtime.h): a CUDA block's threads as ucontext fibers,
// switched at every barrier and warp-collective instruction in a seeded random order.
#include <algorithm>

#include "emu_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {

// AddressSanitizer (LONGATTN_FLASH_EMU_ASAN=1) must be told of every stack switch, or it takes
// a fiber's frames for stray memory and its reports lose the kernel's stack. Each _longjmp
// between stacks is announced (leave) and completed where the target resumes (arrive).
static const void* g_sched_stack = nullptr;  // the scheduler's stack, learnt on the first switch
static size_t g_sched_stack_bytes = 0;
#if defined(__SANITIZE_ADDRESS__)
static void leave(const void* to, size_t bytes) { __sanitizer_start_switch_fiber(nullptr, to, bytes); }
static void arrive_at_fiber() { __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack, &g_sched_stack_bytes); }
static void arrive_at_scheduler() { __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr); }
#else
static void leave(const void*, size_t) {}
static void arrive_at_fiber() {}
static void arrive_at_scheduler() {}
#endif

static Block* g_block = nullptr;
Block& current_block() { return *g_block; }

constexpr size_t kStackBytes = 512 * 1024;

void fiber_entry() {
  arrive_at_fiber();
  Block& b = *g_block;
  const int id = b.current_;
  try {
    (*b.body_)(id);
  } catch (const std::exception& e) {
    if (b.error_.empty()) b.error_ = e.what();
  }
  b.fibers_[id].finished = true;
  leave(g_sched_stack, g_sched_stack_bytes);
  _longjmp(b.sched_jb_, 1);
}

void Block::yield() {
  Fiber& f = fibers_[current_];
  if (_setjmp(f.jb) == 0) {
    leave(g_sched_stack, g_sched_stack_bytes);
    _longjmp(sched_jb_, 1);
  }
  arrive_at_fiber();
}

void Block::wait(Barrier& b) {
  const uint64_t gen = b.gen;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    if (&b == &block_barrier_) {
      // __syncthreads_or is __syncthreads for the block, so all or none must have called it.
      const int n = or_arrivals_[gen & 1];
      if (n != 0 && n != b.expected) fail("threads met at a barrier through both sync() and sync_or()");
      // Every fiber has read generation gen - 1's result (it arrived here since): its slot is
      // the next generation's.
      or_value_[(gen + 1) & 1] = 0;
      or_arrivals_[(gen + 1) & 1] = 0;
    }
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

int Block::sync_or(int pred) {
  const uint64_t gen = block_barrier_.gen;
  or_value_[gen & 1] |= pred != 0;
  ++or_arrivals_[gen & 1];
  wait(block_barrier_);
  return or_value_[gen & 1];
}

void Block::warp_sync() { wait(warp_barriers_[current_ / 32]); }

void Block::run(int threads, uint64_t seed, int policy, const std::function<void(int)>& body) {
  if (threads % 32 != 0) fail("block size must be a multiple of 32");
  fibers_.clear();
  fibers_.resize(threads);
  warp_barriers_.assign(threads / 32, Barrier{32, 0, 0});
  slots_.assign(threads / 32, WarpSlot{});
  block_barrier_ = Barrier{threads, 0, 0};
  or_value_[0] = or_value_[1] = 0;
  or_arrivals_[0] = or_arrivals_[1] = 0;
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
  if (_setjmp(sched_jb_) != 0) arrive_at_scheduler();  // every fiber switch comes back here
  // Only plain locals below.
  const int pick = pick_next();
  if (pick < 0) {
    g_block = nullptr;
    return;
  }
  current_ = pick;
  Fiber& f = fibers_[pick];
  leave(f.stack.data(), f.stack.size());
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
