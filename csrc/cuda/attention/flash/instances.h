// The flash kernels' entry points, one explicit instantiation per generated file in
// instances/ (generate_instances.py holds the list of configurations). Declared without CuTe, so
// the dispatchers that call them compile fast; the definitions are in fwd_launch.h and
// bwd_launch.h.
#pragma once
#include <cuda_runtime_api.h>

#include "common/attention_params.h"
#include "cuda/attention/attention_launch.h"

namespace longattn::cuda::flash {

enum class FlashDtype { kFp16, kBf16 };

// kPlainLogits: ScoreParams::plain() (scale only); the other instantiation carries softcap and
// ALiBi, whose registers would cost the plain path spills.
template <FlashDtype kDtype, int kHeadDim, bool kPlainLogits>
cudaError_t flash_fwd(const AttentionParams& p, cudaStream_t stream);

// kNarrow: the 64-key tiles of parts with 99 KB of shared memory per block (bwd_configs.h).
template <FlashDtype kDtype, int kHeadDim, bool kNarrow>
cudaError_t flash_bwd(const AttentionParams& p, const AttentionGrads& g, cudaStream_t stream);

}  // namespace longattn::cuda::flash
