// simt_emu stand-in: the runtime types the kernel headers name.
#pragma once
#include "cuda_emu.h"
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef struct CUstream_st* cudaStream_t;
// The 16-byte vector type of cuda/device_common.cuh's Elems.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
