// A tensor dtype as the CUDA kernels' KernelDtype, for the registration files (.cpp, with
// torch); the kernel translation units only see cuda/kernel_dtype.h.
#pragma once
#include <c10/core/ScalarType.h>

#include "cuda/kernel_dtype.h"

namespace longattn::cuda {

// st: the dtype of argument `arg` of op `op` (both named in the error); any other dtype than
// float32, float64, float16 and bfloat16 is an error saying so.
KernelDtype kernel_dtype_of(c10::ScalarType st, const char* op, const char* arg);

}  // namespace longattn::cuda
