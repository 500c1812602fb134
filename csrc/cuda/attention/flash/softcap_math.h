// The logit soft cap's tanh, one definition for the flash forward and backward. tanhf would
// compile to tanh.approx (2^-11 relative) under --use_fast_math: the backward's P would then
// disagree with the forward's lse by up to ~0.5% of a logit of softcap size. This form is
// accurate to ~1e-7 absolute with the fast exp2, like the CPU kernel's vector path. Host and
// device: the flash emulator (tests/flash_emu) runs the kernel bodies on the CPU.
#pragma once
#include <cmath>

#include "common/host_device.h"

namespace longattn::cuda::flash {

constexpr float kLog2e = 1.4426950408889634f;

// tanh(y) = 1 - 2 / (exp(2y) + 1); |y| <= 20 keeps exp2 finite, and tanh(20) is 1 in fp32.
LONGATTN_HD float softcap_tanh(float y) {
  const float y2 = fminf(fmaxf(y, -20.f), 20.f) * (2.f * kLog2e);
  return 1.f - 2.f / (exp2f(y2) + 1.f);
}

}  // namespace longattn::cuda::flash
