// csrc/cuda/rope_attention_register.cpp under the emulation (see include/emu_register.h).
#include "emu_register.h"
#include "cuda/rope_attention_register.cpp"
