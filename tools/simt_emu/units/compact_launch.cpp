// csrc/cuda/kvcache/compact_launch.cu compiled for the CPU: its launch sequence runs under include/cuda_emu.h.
#include "cuda/kvcache/compact_launch.cu"
