// Included by units/*_register.cpp before a csrc/cuda/*_register.cpp: the registration is
// compiled unchanged (argument checks, outputs, scratch, the launch calls, error reporting),
// with c10/cuda stand-ins (include/c10/cuda) and its TORCH_LIBRARY_IMPL(longattn, CUDA, m)
// moved to the PrivateUse1 key: emu_ops.install() routes the CPU calls there.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

// After torch: the emulation's macros (__shared__, threadIdx, ...) must not reach its headers.
#include "cuda_runtime.h"

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, PrivateUse1, m, C10_UID)
