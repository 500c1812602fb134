// simt_emu stand-in: C10_CUDA_CHECK turns an emulated launch's error into the exception the
// real macro raises.
#pragma once
#include <c10/util/Exception.h>

#include "cuda_runtime.h"

#define C10_CUDA_CHECK(EXPR)                                                        \
  do {                                                                              \
    const cudaError_t emu_err_ = (EXPR);                                            \
    TORCH_CHECK(emu_err_ == cudaSuccess, "CUDA error (simt_emu): code ", emu_err_); \
  } while (0)
