// csrc/cuda/rope_backward_kernel.cu compiled for the CPU: its kernels run under include/cuda_emu.h.
#include "cuda/rope_backward_kernel.cu"
