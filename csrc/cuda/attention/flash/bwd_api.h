// The flash backward's configurations as traits types (for the dispatcher's shared-memory
// table) and the launch template of one configuration (bwd_launch.h), which flash_bwd
// (instances.h) runs.
#pragma once
#include <cuda_runtime_api.h>

#include "cuda/attention/attention_launch.h"
#include "cuda/attention/flash/bwd_configs.h"

namespace longattn::cuda::flash {

#if defined(__CUDACC__)
template <typename Elem, int kHeadDim, bool kNarrow = false>
using DeviceBwdTraits = typename BwdConfig<Elem, kHeadDim, kNarrow, FlashDeviceOps>::Traits;
#endif

template <class Kt>
cudaError_t run_flash_bwd(const AttentionParams& p, const AttentionGrads& g, cudaStream_t stream);

}  // namespace longattn::cuda::flash
