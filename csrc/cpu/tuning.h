// Overrides of the CPU kernels' tuning: the forward tile shape and the split-K chunk size.
// From the environment, read once (LONGATTN_CPU_TILES="q,k", LONGATTN_CPU_SPLITK=n: key tiles
// per chunk, 0 = never split); tests and benchmarks set them through
// longattn._C._set_cpu_tuning. Unset fields keep the kernels' own choice.
#pragma once
#include <cstdint>

namespace longattn::cpu {

struct CpuTuning {
  int64_t tile_q = 0, tile_k = 0;  // 0: the kernels' choice
  int64_t splitk = -1;             // key tiles per split chunk; -1: the kernels' rule
};

CpuTuning cpu_tuning();
void set_cpu_tuning(const CpuTuning& t);

}  // namespace longattn::cpu
