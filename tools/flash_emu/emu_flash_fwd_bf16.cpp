// The emulated forward's bf16 instantiations (see emu_flash_fwd.h).
#include "emu_flash_fwd.h"

template void emu::forward<cutlass::bfloat16_t>(const EmuArgs&);
