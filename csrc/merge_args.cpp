#include "merge_args.h"

#include <c10/util/Exception.h>

namespace longattn {

MergeShape check_merge_args(at::TensorList outs, at::TensorList lses) {
  TORCH_CHECK_VALUE(!outs.empty(), "merge_attention needs at least one partial (outs is empty)");
  TORCH_CHECK_VALUE(outs.size() == lses.size(), "outs and lses must have the same length, got ",
                    outs.size(), " and ", lses.size());
  const at::Tensor& o0 = outs[0];
  TORCH_CHECK_VALUE(o0.dim() >= 3, "outs[0] must have shape [*, L, H, D], got ", o0.sizes());
  const auto st = o0.scalar_type();
  TORCH_CHECK_VALUE(at::isFloatingType(st), "outs must be floating point, got ", st);
  MergeShape m;
  m.D = o0.size(-1);
  m.H = o0.size(-2);
  m.L = o0.size(-3);
  m.outer = 1;
  for (int64_t d = 0; d + 3 < o0.dim(); ++d) m.outer *= o0.size(d);
  m.rows = m.outer * m.L;
  std::vector<int64_t> lshape(o0.sizes().begin(), o0.sizes().end() - 3);
  lshape.push_back(m.H);
  lshape.push_back(m.L);
  const auto lst = lses[0].scalar_type();
  TORCH_CHECK_VALUE(lst == at::kFloat || lst == at::kDouble, "lses must be float32 (or float64), got ",
                    lst);
  for (size_t i = 0; i < outs.size(); ++i) {
    TORCH_CHECK_VALUE(outs[i].sizes() == o0.sizes(), "outs[", i, "] has shape ", outs[i].sizes(),
                      " but outs[0] has ", o0.sizes());
    TORCH_CHECK_VALUE(outs[i].scalar_type() == st, "outs[", i, "] has dtype ",
                      outs[i].scalar_type(), " but outs[0] has ", st);
    TORCH_CHECK_VALUE(outs[i].device() == o0.device() && lses[i].device() == o0.device(),
                      "outs[", i, "] and lses[", i, "] must be on outs[0]'s device ", o0.device());
    TORCH_CHECK_VALUE(lses[i].sizes() == at::IntArrayRef(lshape), "lses[", i,
                      "] must have shape [*, H, L] = ", at::IntArrayRef(lshape), ", got ",
                      lses[i].sizes());
    TORCH_CHECK_VALUE(lses[i].scalar_type() == lst, "lses[", i, "] has dtype ",
                      lses[i].scalar_type(), " but lses[0] has ", lst);
  }
  return m;
}

}  // namespace longattn
