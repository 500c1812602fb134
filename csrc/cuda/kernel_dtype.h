// The element type a CUDA kernel is instantiated for, as every launch function takes it (the
// attention, merge, rope and KV-cache kernels). A plain enum: the launch headers and the kernel
// translation units stay torch-free. Registrations get it from a tensor's dtype with
// kernel_dtype_of (cuda/kernel_dtype_of.h).
#pragma once

namespace longattn::cuda {

enum class KernelDtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

}  // namespace longattn::cuda
