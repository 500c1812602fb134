// csrc/cuda/kvcache/decode_chunk_kernel.cu compiled for the CPU: its kernels run under include/cuda_emu.h.
#include "cuda/kvcache/decode_chunk_kernel.cu"
