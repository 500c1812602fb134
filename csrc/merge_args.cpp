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

MergeIntoShape check_merge_into_args(const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& part_out, const at::Tensor& part_lse,
                                     int64_t row_start) {
  constexpr const char* op = "merge_attention_";
  TORCH_CHECK_VALUE(part_out.dim() >= 3, op, ": part_out must have shape [*, n, H, D], got ",
                    part_out.sizes());
  const auto st = part_out.scalar_type();
  TORCH_CHECK_VALUE(at::isFloatingType(st), op, ": part_out must be floating point, got ", st);
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t nd = part_out.dim();
  MergeIntoShape m;
  m.D = part_out.size(nd - 1);
  m.H = part_out.size(nd - 2);
  m.n = part_out.size(nd - 3);
  m.outer = 1;
  for (int64_t d = 0; d + 3 < nd; ++d) m.outer *= part_out.size(d);
  const at::IntArrayRef outer_dims = part_out.sizes().slice(0, nd - 3);
  TORCH_CHECK_VALUE(out.dim() == nd && out.sizes().slice(0, nd - 3) == outer_dims &&
                        out.size(nd - 2) == m.H && out.size(nd - 1) == m.D,
                    op, ": out must have shape [*, L, H, D] with part_out's * = ", outer_dims,
                    ", H = ", m.H, ", D = ", m.D, ", got ", out.sizes());
  m.L = out.size(nd - 3);
  TORCH_CHECK_VALUE(row_start >= 0 && row_start <= m.L - m.n, op, ": rows [", row_start, ", ",
                    row_start, " + ", m.n, ") of part_out do not fit in out's ", m.L, " rows");
  std::vector<int64_t> lshape(outer_dims.begin(), outer_dims.end());
  lshape.push_back(m.H);
  lshape.push_back(m.n);
  TORCH_CHECK_VALUE(part_lse.sizes() == at::IntArrayRef(lshape), op,
                    ": part_lse must have shape [*, H, n] = ", at::IntArrayRef(lshape), ", got ",
                    part_lse.sizes());
  lshape.back() = m.L;
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lshape), op,
                    ": lse must have shape [*, H, L] = ", at::IntArrayRef(lshape), ", got ",
                    lse.sizes());
  TORCH_CHECK_VALUE(part_lse.scalar_type() == at::kFloat || part_lse.scalar_type() == at::kDouble,
                    op, ": part_lse must be float32 (or float64), got ", part_lse.scalar_type());
  TORCH_CHECK_VALUE(out.scalar_type() == acc && lse.scalar_type() == acc, op,
                    ": out and lse must be ", acc, " (the accumulation type of ", st,
                    " partials), got ", out.scalar_type(), " and ", lse.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous() && lse.is_contiguous(), op,
                    ": out and lse must be contiguous (they are updated in place)");
  TORCH_CHECK_VALUE(lse.device() == out.device() && part_out.device() == out.device() &&
                        part_lse.device() == out.device(),
                    op, ": lse, part_out and part_lse must be on out's device ", out.device());
  return m;
}

}  // namespace longattn
