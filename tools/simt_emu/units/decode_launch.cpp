// csrc/cuda/kvcache/decode_launch.cu compiled for the CPU: its plan runs against the emulated device.
#include "cuda/kvcache/decode_launch.cu"
