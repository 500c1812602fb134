// The C entry point of the emulated forward (emu_flash_fwd.h), called by tests/test_flash_emu.py.
#include <cstdio>

#include "emu_flash_fwd.h"

#include "cuda/attention/attention_launch.h"

extern "C" {

// 0 on success; otherwise the message is copied into err.
int emu_flash_fwd(const EmuArgs* a, char* err, int err_len) {
  using longattn::cuda::KernelDtype;
  try {
    const KernelDtype dtype = a->dtype == 0 ? KernelDtype::kFloat16 : KernelDtype::kBFloat16;
    if (!longattn::cuda::flash_supported(dtype, a->head_dim)) emu::fail("no flash forward for this head dim");
    if (dtype == KernelDtype::kFloat16) {
      emu::forward<cutlass::half_t>(*a);
    } else {
      emu::forward<cutlass::bfloat16_t>(*a);
    }
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
}

}  // extern "C"
