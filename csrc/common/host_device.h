// Marks functions that both the CPU and the CUDA kernels call, so one definition of the
// semantics serves both backends. No torch includes here or in anything under common/.
#pragma once

#if defined(__CUDACC__)
#define LONGATTN_HD __host__ __device__ __forceinline__
#else
#define LONGATTN_HD inline
#endif
