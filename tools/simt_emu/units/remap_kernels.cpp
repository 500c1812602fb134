// csrc/cuda/attention/remap/*.cu compiled for the CPU: the SIMT rope_attention kernels run under
// include/cuda_emu.h.
#include "cuda/attention/remap/remap_api.cu"
#include "cuda/attention/remap/remap_bf16.cu"
#include "cuda/attention/remap/remap_fp16.cu"
#include "cuda/attention/remap/remap_fp32.cu"
#include "cuda/attention/remap/remap_fp64.cu"
