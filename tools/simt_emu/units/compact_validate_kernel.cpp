// csrc/cuda/kvcache/compact_validate_kernel.cu compiled for the CPU: its kernels run under include/cuda_emu.h.
#include "cuda/kvcache/compact_validate_kernel.cu"
