#include "cpu/tuning.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace longattn::cpu {
namespace {

CpuTuning from_environment() {
  CpuTuning t;
  if (const char* env = std::getenv("LONGATTN_CPU_TILES")) {
    long q = 0, k = 0;
    if (std::sscanf(env, "%ld,%ld", &q, &k) == 2 && q > 0 && k > 0) {
      t.tile_q = q;
      t.tile_k = k;
    }
  }
  if (const char* env = std::getenv("LONGATTN_CPU_SPLITK")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n >= 0) t.splitk = n;
  }
  return t;
}

// Three words, each read with one atomic load per call (the fields are independent knobs).
struct Store {
  std::atomic<int64_t> tile_q, tile_k, splitk;
  Store() {
    const CpuTuning t = from_environment();
    tile_q = t.tile_q;
    tile_k = t.tile_k;
    splitk = t.splitk;
  }
};

Store& store() {
  static Store s;
  return s;
}

}  // namespace

CpuTuning cpu_tuning() {
  Store& s = store();
  return {s.tile_q.load(std::memory_order_relaxed), s.tile_k.load(std::memory_order_relaxed),
          s.splitk.load(std::memory_order_relaxed)};
}

void set_cpu_tuning(const CpuTuning& t) {
  Store& s = store();
  s.tile_q = t.tile_q;
  s.tile_k = t.tile_k;
  s.splitk = t.splitk;
}

}  // namespace longattn::cpu
