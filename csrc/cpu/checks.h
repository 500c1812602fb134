// Hooks for the tests: CPU building blocks that have a vector path, run next to the shared
// scalar definition they must agree with (bound in module.cpp as longattn._C._check_*).
#pragma once
#include <utility>
#include <vector>

namespace longattn::cpu {

// softcap_row (cpu/vec_math.h, the vector path wherever a full vector fits) on x as one row,
// and softcap_logit (common/scores.h) on each element: (row result, scalar result).
std::pair<std::vector<float>, std::vector<float>> softcap_row_vs_scalar(std::vector<float> x,
                                                                        float scale, float cap);

}  // namespace longattn::cpu
