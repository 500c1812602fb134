#include "cpu/checks.h"

#include "common/scores.h"
#include "cpu/vec_math.h"

namespace longattn::cpu {

std::pair<std::vector<float>, std::vector<float>> softcap_row_vs_scalar(std::vector<float> x,
                                                                        float scale, float cap) {
  std::vector<float> scalar(x.size());
  const float inv = scale / cap;
  for (size_t j = 0; j < x.size(); ++j) scalar[j] = softcap_logit(x[j], inv, cap);
  softcap_row<float>(x.data(), static_cast<int64_t>(x.size()), scale, cap);
  return {std::move(x), std::move(scalar)};
}

}  // namespace longattn::cpu
