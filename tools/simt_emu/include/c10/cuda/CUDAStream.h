// simt_emu stand-in: the emulation runs every launch at once, in order; streams are names only.
#pragma once
#include "cuda_runtime.h"

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(int /*device*/ = -1) { return {}; }

}  // namespace c10::cuda
