// The Hopper forward's entry points, one explicit instantiation per file in instances/.
// Declared without CuTe, so the dispatcher that calls them compiles fast; the definition is in
// fwd_launch.h.
#pragma once
#include <cuda_runtime_api.h>

#include "common/attention_params.h"

namespace longattn::cuda::sm90 {

enum class Sm90Dtype { kFp16, kBf16 };

template <Sm90Dtype kDtype, int kHeadDim>
cudaError_t sm90_fwd(const AttentionParams& p, cudaStream_t stream);

}  // namespace longattn::cuda::sm90
