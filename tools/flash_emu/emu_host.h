// The host side shared by the emulator's drivers (emu_flash_fwd.cpp, emu_flash_bwd.cpp): the
// call's arguments as the Python test passes them (ctypes), AttentionParams from them, shared
// memory with guard bands, and the launch of a grid as emulated blocks one after another.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "emu_runtime.h"

#include "common/attention_params.h"

extern "C" {

// Mirrored by tests/test_flash_emu.py (ctypes). Forward: q, k, v in; out, lse written.
// Backward: out, lse, dout, dlse in; dq, dk, dv, dsink written.
struct EmuArgs {
  int32_t dtype;  // 0 fp16, 1 bf16
  int32_t head_dim;
  int32_t deterministic;
  int32_t narrow;  // the 64-key hd128 configuration
  int32_t policy;  // bit 1: one warp at a time in random warp order (else random fibers);
                   // bits 2 / 4: cp.async lands at issue / at random (else at the wait)
  int32_t causal;
  int32_t q_start_default;
  int32_t max_grid_z;  // forward: a grid z limit below the hardware's (0: the hardware's)
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

namespace emu {

inline longattn::AttentionParams to_params(const EmuArgs& a) {
  longattn::AttentionParams p;
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

// Shared memory of one block: NaN-filled (0xff) so reads of never-written smem poison the
// results, with guard bands on both sides checked after the block. Under AddressSanitizer it is
// allocated at its exact size instead, so ASan's redzones catch reads out of bounds too.
struct Smem {
#if defined(__SANITIZE_ADDRESS__)
  static constexpr size_t kGuard = 0;
#else
  static constexpr size_t kGuard = 4096;
#endif
  char* alloc = nullptr;
  char* base = nullptr;
  size_t bytes = 0;
  explicit Smem(size_t n) : bytes(n) {
    // posix_memalign: no rounding of the size to the alignment, which would hide an overrun.
    void* p = nullptr;
    if (posix_memalign(&p, 128, n + 2 * kGuard) != 0) fail("shared memory allocation failed");
    alloc = static_cast<char*>(p);
    base = alloc + kGuard;
  }
  ~Smem() { std::free(alloc); }
  Smem(const Smem&) = delete;
  Smem& operator=(const Smem&) = delete;
  void reset() { std::memset(alloc, 0xff, bytes + 2 * kGuard); }
  void check() const {
    for (size_t i = 0; i < kGuard; ++i) {
      if (static_cast<unsigned char>(alloc[i]) != 0xff) fail("shared memory written before its start");
    }
    for (size_t i = bytes; i < bytes + kGuard; ++i) {
      if (static_cast<unsigned char>(base[i]) != 0xff) fail("shared memory written past its size");
    }
  }
};

inline uint64_t mix(uint64_t seed, int64_t x, int64_t y, int64_t z) {
  uint64_t h = seed ^ 0x9e3779b97f4a7c15ull;
  for (int64_t v : {x, y, z}) h = (h ^ uint64_t(v)) * 0xbf58476d1ce4e5b9ull + 0x94d049bb133111ebull;
  return h;
}

// Runs the blocks of a (gx, gy, gz) grid one after another, each on fresh NaN-filled shared
// memory and its own seeded schedule: body(x, y, z, tid, smem) is one thread of block (x, y, z).
class Launcher {
 public:
  explicit Launcher(const EmuArgs& a) : seed_(a.seed), policy_(a.policy) {
    for (int64_t i = 0; i < a.n_ranges; ++i) {
      blk_.global_ranges.push_back({uintptr_t(a.ranges[2 * i]), uintptr_t(a.ranges[2 * i] + a.ranges[2 * i + 1])});
    }
  }

  template <class Body>
  void operator()(int64_t gx, int64_t gy, int64_t gz, int threads, size_t smem_bytes, Body&& body) {
    if (gx <= 0 || gy <= 0 || gz <= 0) return;
    Smem smem(smem_bytes);
    for (int64_t z = 0; z < gz; ++z) {
      for (int64_t y = 0; y < gy; ++y) {
        for (int64_t x = 0; x < gx; ++x) {
          smem.reset();
          blk_.run(threads, mix(seed_, x, y, z), policy_, [&](int tid) { body(x, y, z, tid, smem.base); });
          smem.check();
        }
      }
    }
  }

 private:
  Block blk_;
  uint64_t seed_;
  int policy_;
};

}  // namespace emu
