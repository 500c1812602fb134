// simt_emu stand-in: the runtime types and calls the kernels and their launchers use, and
// launch_kernel, which runs a grid under cuda_emu.h instead of device_common.cuh's <<<>>>.
// Launches are checked as the driver would (grid and block limits, dynamic shared memory over
// 48 KiB only after cudaFuncSetAttribute, never over the device's opt-in limit); a bad one
// returns cudaErrorInvalidConfiguration / cudaErrorInvalidValue and runs nothing.
#pragma once
#include <map>

#include "cuda_emu.h"

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
typedef struct CUstream_st* cudaStream_t;

// The vector types the kernels load and store through.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

namespace emu {

// The emulated device: its opt-in shared memory per block and the scheduling seed.
struct Device {
  size_t smem_optin = 80 * 1024;
  int sms = 8;  // multiprocessors: what the decode split sizes its grid for
  uint32_t seed = 0;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute, per kernel
  std::map<const void*, int64_t> launches;       // grids run, per kernel (a coverage report)
};
inline Device g_device;

constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without the opt-in

}  // namespace emu

inline cudaError_t cudaGetLastError() { return cudaSuccess; }  // launches report directly

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(emu::g_device.smem_optin);
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = emu::g_device.sms;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > emu::g_device.smem_optin) {
    return cudaErrorInvalidValue;
  }
  emu::g_device.max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t /*stream*/) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

// device_common.cuh's launch_kernel, run on the CPU: every CTA of the grid, args copied into
// each thread's parameters.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t /*stream*/, const Args&... args) {
  const int64_t threads = int64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535 || threads == 0 || threads > emu::kMaxBlockThreads || block.z > 64) {
    return cudaErrorInvalidConfiguration;
  }
  if (smem_bytes > emu::kDefaultSmem) {
    const auto it = emu::g_device.max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
    if (it == emu::g_device.max_dynamic_smem.end() || static_cast<size_t>(it->second) < smem_bytes) {
      return cudaErrorInvalidValue;  // what the driver says past the kernel's attribute
    }
  }
  ++emu::g_device.launches[reinterpret_cast<const void*>(kernel)];
  emu::launch(grid, block, smem_bytes, [&] { kernel(args...); }, emu::g_device.seed);
  return cudaSuccess;
}
