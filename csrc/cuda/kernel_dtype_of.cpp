#include "cuda/kernel_dtype_of.h"

#include <c10/util/Exception.h>

namespace longattn::cuda {

KernelDtype kernel_dtype_of(c10::ScalarType st, const char* op, const char* arg) {
  switch (st) {
    case c10::kFloat: return KernelDtype::kFloat32;
    case c10::kDouble: return KernelDtype::kFloat64;
    case c10::kHalf: return KernelDtype::kFloat16;
    case c10::kBFloat16: return KernelDtype::kBFloat16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, op, ": ", arg, " has dtype ", st,
                    "; the CUDA kernels take float32, float64, float16 or bfloat16");
}

}  // namespace longattn::cuda
