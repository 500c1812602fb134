// The emulated forward's fp16 instantiations (see emu_flash_fwd.h).
#include "emu_flash_fwd.h"

template void emu::forward<cutlass::half_t>(const EmuArgs&);
