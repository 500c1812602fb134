// csrc/cuda/merge_register.cpp under the emulation (see include/emu_register.h).
#include "emu_register.h"
#include "cuda/merge_register.cpp"
