// A host emulator for the flash attention CUDA kernels (no GPU needed): every CUDA thread of a
// block is a fiber; warp-collective instructions (ldmatrix, mma.sync, shuffles) are exchanges
// between the 32 fibers of a warp, __syncthreads a barrier of the block's fibers, cp.async a
// per-thread queue of copies that land only at cp.async.wait (so a missing wait reads stale
// shared memory). Fibers are scheduled in a seeded random order, optionally letting one warp
// run far ahead of the others, so a missing __syncthreads shows up as a wrong result.
//
// The kernel bodies are compiled unchanged with FwdTraits<..., EmuOps> / BwdTraits<..., EmuOps>:
// only the instruction policy (csrc/cuda/attention/flash/device_ops.h) differs from the device
// build. The scheduler is emu_block.cpp, the drivers emu_flash_fwd.cpp and emu_flash_bwd.cpp.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "cuda/attention/flash/device_ops.h"

namespace emu {

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("flash emu: " + what); }

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t gen = 0;
};

struct CpCopy {
  void* dst;
  const void* src;
};

struct Fiber {
  ucontext_t uc;
  jmp_buf jb;
  std::vector<char> stack;
  bool started = false, finished = false;
  const Barrier* wait_on = nullptr;
  uint64_t wait_gen = 0;
  // cp.async: committed groups (oldest first) and the open group.
  std::vector<std::vector<CpCopy>> groups;
  std::vector<CpCopy> open;
};

// A warp's exchange area for one collective.
struct WarpSlot {
  int op = 0;  // which collective each lane entered (must agree)
  const void* ptr[32];
  uint32_t regs[32][8];
  float f[32][8];
};

struct Range {
  uintptr_t lo, hi;
};

class Block {
 public:
  // Runs body(tid) for tid in [0, threads) as fibers until all return.
  void run(int threads, uint64_t seed, int policy, const std::function<void(int)>& body);

  void sync();  // __syncthreads
  int sync_or(int pred);  // __syncthreads_or
  void warp_sync();
  int tid() const { return current_; }
  int lane() const { return current_ % 32; }
  WarpSlot& slot() { return slots_[current_ / 32]; }
  // Policy bit 2: cp.async copies land at issue (else at the wait), bit 4: a coin flip each.
  bool copy_lands_early() {
    if (policy_ & 4) return (rng_() & 1) != 0;
    return (policy_ & 2) != 0;
  }
  Fiber& fiber() { return fibers_[current_]; }

  std::vector<Range> global_ranges;  // where cp.async may read

 private:
  friend void fiber_entry();
  void yield();
  int pick_next();  // the next fiber to run, -1 when all finished
  bool runnable(const Fiber& f) const {
    return !f.finished && (f.wait_on == nullptr || f.wait_on->gen != f.wait_gen);
  }
  void wait(Barrier& b);

  std::vector<Fiber> fibers_;
  std::vector<Barrier> warp_barriers_;
  std::vector<WarpSlot> slots_;
  Barrier block_barrier_;
  // sync_or: the OR of the values and the number of sync_or arrivals of barrier generation g
  // in slot g % 2 (a fiber reads its result before it can arrive at the barrier after next).
  int or_value_[2] = {0, 0};
  int or_arrivals_[2] = {0, 0};
  std::vector<int> warp_priority_, cand_;
  uint64_t last_block_gen_ = 0;
  std::mt19937_64 rng_;
  int policy_ = 0;
  int current_ = -1;
  jmp_buf sched_jb_;
  const std::function<void(int)>* body_ = nullptr;
  std::string error_;
};

Block& current_block();

// ---- emulated instructions -------------------------------------------------------------

// ldmatrix .x4 (.trans): lane l gives the address of row l % 8 of matrix l / 8; register j of
// lane l receives 2 elements of matrix j: (row l/4, cols 2(l%4), +1), or transposed
// (rows 2(l%4), +1 of col l/4).
template <bool kTrans>
struct EmuLdsm {
  using SRegisters = cute::uint128_t[1];
  using DRegisters = uint32_t[4];
  static void copy(cute::uint128_t const& src, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
    Block& blk = current_block();
    WarpSlot& s = blk.slot();
    const int lane = blk.lane();
    if ((reinterpret_cast<uintptr_t>(&src) & 15) != 0) fail("ldmatrix row address not 16-byte aligned");
    s.ptr[lane] = &src;
    s.regs[lane][0] = kTrans ? 2 : 1;
    blk.warp_sync();
    for (int l = 0; l < 32; ++l) {
      if (s.regs[l][0] != s.regs[lane][0]) fail("warp lanes diverged at ldmatrix");
    }
    uint32_t out[4];
    for (int j = 0; j < 4; ++j) {
      auto elem = [&](int row, int col) {
        return reinterpret_cast<const uint16_t*>(s.ptr[8 * j + row])[col];
      };
      uint16_t e0, e1;
      if (!kTrans) {
        e0 = elem(lane / 4, 2 * (lane % 4));
        e1 = elem(lane / 4, 2 * (lane % 4) + 1);
      } else {
        e0 = elem(2 * (lane % 4), lane / 4);
        e1 = elem(2 * (lane % 4) + 1, lane / 4);
      }
      out[j] = uint32_t(e0) | (uint32_t(e1) << 16);
    }
    blk.warp_sync();
    d0 = out[0];
    d1 = out[1];
    d2 = out[2];
    d3 = out[3];
  }
};

// mma.sync m16n8k16 with fp32 accumulation. Fragment ownership is read from CuTe's traits of
// the real instruction (the layouts the kernels are built on); the products are exact in fp32
// and summed in double.
template <class Elem, class RealOp>
struct EmuMma {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0, uint32_t const& a1,
                  uint32_t const& a2, uint32_t const& a3, uint32_t const& b0, uint32_t const& b1,
                  float const& c0, float const& c1, float const& c2, float const& c3) {
    using Traits = cute::MMA_Traits<RealOp>;
    Block& blk = current_block();
    WarpSlot& s = blk.slot();
    const int lane = blk.lane();
    const uint32_t in[6] = {a0, a1, a2, a3, b0, b1};
    for (int i = 0; i < 6; ++i) s.regs[lane][i] = in[i];
    s.regs[lane][6] = 3;
    s.f[lane][0] = c0;
    s.f[lane][1] = c1;
    s.f[lane][2] = c2;
    s.f[lane][3] = c3;
    blk.warp_sync();
    for (int l = 0; l < 32; ++l) {
      if (s.regs[l][6] != 3) fail("warp lanes diverged at mma");
    }
    float A[16][16], B[8][16], C[16][8];
    auto half_of = [](uint32_t r, int hi) { return float(Elem::bitcast(uint16_t(hi ? r >> 16 : r))); };
    for (int l = 0; l < 32; ++l) {
      for (int v = 0; v < 8; ++v) {
        const int ia = typename Traits::ALayout{}(l, v);  // m + 16 k
        A[ia % 16][ia / 16] = half_of(s.regs[l][v / 2], v % 2);
      }
      for (int v = 0; v < 4; ++v) {
        const int ib = typename Traits::BLayout{}(l, v);  // n + 8 k
        B[ib % 8][ib / 8] = half_of(s.regs[l][4 + v / 2], v % 2);
      }
      for (int v = 0; v < 4; ++v) {
        const int ic = typename Traits::CLayout{}(l, v);  // m + 16 n
        C[ic % 16][ic / 16] = s.f[l][v];
      }
    }
    float out[4];
    for (int v = 0; v < 4; ++v) {
      const int ic = typename Traits::CLayout{}(lane, v);
      const int m = ic % 16, n = ic / 16;
      double acc = C[m][n];
      for (int k = 0; k < 16; ++k) acc += double(A[m][k]) * double(B[n][k]);
      out[v] = float(acc);
    }
    blk.warp_sync();
    d0 = out[0];
    d1 = out[1];
    d2 = out[2];
    d3 = out[3];
  }
};

// cp.async 16 bytes: queued, or performed at once (see Block::copy_lands_early).
struct EmuCpAsync {
  using SRegisters = cute::uint128_t[1];
  using DRegisters = cute::uint128_t[1];
  static void copy(cute::uint128_t const& src, cute::uint128_t& dst) {
    Block& blk = current_block();
    if ((reinterpret_cast<uintptr_t>(&src) & 15) || (reinterpret_cast<uintptr_t>(&dst) & 15)) {
      fail("cp.async address not 16-byte aligned");
    }
    const uintptr_t a = reinterpret_cast<uintptr_t>(&src);
    bool ok = false;
    for (const Range& r : blk.global_ranges) ok = ok || (a >= r.lo && a + 16 <= r.hi);
    if (!ok) fail("cp.async reads outside every input buffer");
    const CpCopy c{&dst, &src};
    // The hardware lands a copy at any time between issue and wait: early landing exposes a
    // buffer reused while other warps still read it, late landing a read before the wait.
    if (blk.copy_lands_early()) {
      perform(c);
    } else {
      blk.fiber().open.push_back(c);
    }
  }
  static void perform(const CpCopy& c) { std::memcpy(c.dst, c.src, 16); }
};

inline void perform(const CpCopy& c) { EmuCpAsync::perform(c); }

inline void cp_fence() {
  Fiber& f = current_block().fiber();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

// cp.async.wait_group n (n > 0) / wait_all (n == 0, also the open group).
inline void cp_wait(int n) {
  Fiber& f = current_block().fiber();
  if (n == 0) {
    for (auto& g : f.groups) for (auto& c : g) perform(c);
    for (auto& c : f.open) perform(c);
    f.groups.clear();
    f.open.clear();
    return;
  }
  while (static_cast<int>(f.groups.size()) > n) {
    for (auto& c : f.groups.front()) perform(c);
    f.groups.erase(f.groups.begin());
  }
}

inline float shfl_xor(float v, int mask) {
  Block& blk = current_block();
  WarpSlot& s = blk.slot();
  const int lane = blk.lane();
  s.f[lane][0] = v;
  s.regs[lane][0] = 4;
  blk.warp_sync();
  const float r = s.f[lane ^ mask][0];
  blk.warp_sync();
  return r;
}

// __ballot_sync over the full warp.
inline uint32_t ballot(bool pred) {
  Block& blk = current_block();
  WarpSlot& s = blk.slot();
  const int lane = blk.lane();
  s.regs[lane][0] = 5;
  s.regs[lane][1] = pred ? 1u : 0u;
  blk.warp_sync();
  uint32_t bits = 0;
  for (int l = 0; l < 32; ++l) {
    if (s.regs[l][0] != 5) fail("warp lanes diverged at ballot");
    bits |= s.regs[l][1] << l;
  }
  blk.warp_sync();
  return bits;
}

struct EmuOps {
  template <class Elem>
  using Mma = EmuMma<Elem, longattn::cuda::flash::Sm80MmaF32<Elem>>;
  using LdsmN = EmuLdsm<false>;
  using LdsmT = EmuLdsm<true>;
  using CpAsync = EmuCpAsync;
  static void sync() { current_block().sync(); }
  static int sync_or(int pred) { return current_block().sync_or(pred); }
  static void cp_async_fence() { cp_fence(); }
  template <int N>
  static void cp_async_wait() { cp_wait(N); }
  static void atomic_add(float* dst, float v) { *dst += v; }
  static float shfl_xor(float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }
  static uint32_t ballot(bool pred) { return emu::ballot(pred); }
};

}  // namespace emu

namespace cute {

template <class Elem, class RealOp>
struct MMA_Traits<emu::EmuMma<Elem, RealOp>> : MMA_Traits<RealOp> {};

template <bool kTrans>
struct Copy_Traits<emu::EmuLdsm<kTrans>>
    : Copy_Traits<std::conditional_t<kTrans, SM75_U16x8_LDSM_T, SM75_U32x4_LDSM_N>> {};

template <>
struct Copy_Traits<emu::EmuCpAsync> {
  using ThrID = Layout<_1>;
  using SrcLayout = Layout<Shape<_1, Int<128>>>;
  using DstLayout = Layout<Shape<_1, Int<128>>>;
  using RefLayout = SrcLayout;

  template <class TS, class SLayout, class TD, class DLayout>
  friend void copy_unpack(Copy_Traits const&, Tensor<TS, SLayout> const& src, Tensor<TD, DLayout>& dst) {
    static_assert(is_gmem<TS>::value, "Expected gmem source for cp.async.");
    static_assert(is_smem<TD>::value, "Expected smem destination for cp.async.");
    Tensor rS = recast<uint128_t>(src);
    Tensor rD = recast<uint128_t>(dst);
    CUTE_STATIC_ASSERT_V(size(rS) == Int<1>{});
    CUTE_STATIC_ASSERT_V(size(rD) == Int<1>{});
    emu::EmuCpAsync::copy(rS[0], rD[0]);
  }
};

}  // namespace cute
