// CPU merge of partial attentions: memory-bound, one pass over every partial, parallel over
// rows, fp32 (fp64 for fp64 inputs) accumulation. Also the running form in place.
#include "cpu/merge.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/merge.h"
#include "cpu/parallel.h"
#include "cpu/tile.h"
#include "merge_args.h"

namespace longattn::cpu {
namespace {

std::vector<at::Tensor> contiguous_as(at::TensorList ts, std::optional<at::ScalarType> dtype) {
  std::vector<at::Tensor> r;
  r.reserve(ts.size());
  for (const auto& t : ts) r.push_back((dtype ? t.to(*dtype) : t).contiguous());
  return r;
}

template <typename T>
std::vector<const T*> pointers(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> r;
  for (const auto& t : ts) r.push_back(static_cast<const T*>(t.data_ptr()));
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_attention_cpu(at::TensorList outs, at::TensorList lses) {
  const MergeShape ms = check_merge_args(outs, lses);
  const auto st = outs[0].scalar_type();
  const auto acc_type = st == at::kDouble ? at::kDouble : at::kFloat;
  const auto o = contiguous_as(outs, std::nullopt);
  const auto l = contiguous_as(lses, acc_type);
  at::Tensor out = at::empty(outs[0].sizes(), outs[0].options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lses[0].sizes(), l[0].options());
  const int n = static_cast<int>(outs.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "longattn::merge_attention", [&] {
    using A = acc_t<scalar_t>;
    const auto op = pointers<scalar_t>(o);
    const auto lp = pointers<A>(l);
    A* lse_out = lse.data_ptr<A>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    const int64_t H = ms.H, L = ms.L, D = ms.D;
    parallel_for(ms.rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<A> ls(n), w(n), acc(D), tmp(D);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L, i = row % L;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t lidx = (b * H + h) * L + i;
          for (int k = 0; k < n; ++k) ls[k] = lp[k][lidx];
          lse_out[lidx] = merge_weights<A>(ls.data(), n, w.data());
          std::fill(acc.begin(), acc.end(), A(0));
          const int64_t off = (row * H + h) * D;
          for (int k = 0; k < n; ++k) {
            if (w[k] == A(0)) continue;
            int64_t ld;
            const A* src = load_rows<scalar_t>(op[k] + off, D, 1, D, tmp.data(), &ld);
            for (int64_t d = 0; d < D; ++d) acc[d] += w[k] * src[d];
          }
          store_row<scalar_t>(acc.data(), out_p + off, D);
        }
      }
    });
  });
  // lse follows attention's convention: fp32, fp64 for fp64 outputs.
  return {out, lse};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> merge_attention_backward_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, at::TensorList outs,
    at::TensorList lses, const at::Tensor& out, const at::Tensor& lse) {
  const MergeShape ms = check_merge_args(outs, lses);
  TORCH_CHECK_VALUE(dout.sizes() == outs[0].sizes(), "dout must have shape ", outs[0].sizes(),
                    ", got ", dout.sizes());
  TORCH_CHECK_VALUE(out.sizes() == outs[0].sizes() && lse.sizes() == lses[0].sizes(),
                    "out/lse must be merge_attention's outputs");
  const auto st = outs[0].scalar_type();
  const auto acc_type = st == at::kDouble ? at::kDouble : at::kFloat;
  const auto o = contiguous_as(outs, std::nullopt);
  const auto l = contiguous_as(lses, acc_type);
  const at::Tensor dout_c = dout.to(st).contiguous();
  const at::Tensor lse_c = lse.to(acc_type).contiguous();
  const at::Tensor dlse_c = dlse ? dlse->to(acc_type).contiguous() : at::Tensor();
  const int n = static_cast<int>(outs.size());
  std::vector<at::Tensor> douts, dlses;
  for (int k = 0; k < n; ++k) {
    douts.push_back(at::empty(outs[k].sizes(), outs[k].options().memory_format(at::MemoryFormat::Contiguous)));
    dlses.push_back(at::empty(lses[k].sizes(), l[k].options()));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "longattn::merge_attention_backward", [&] {
    using A = acc_t<scalar_t>;
    const auto op = pointers<scalar_t>(o);
    const auto lp = pointers<A>(l);
    std::vector<scalar_t*> dop;
    std::vector<A*> dlp;
    for (int k = 0; k < n; ++k) {
      dop.push_back(douts[k].data_ptr<scalar_t>());
      dlp.push_back(dlses[k].data_ptr<A>());
    }
    const scalar_t* dout_p = dout_c.data_ptr<scalar_t>();
    const A* lse_p = lse_c.data_ptr<A>();
    const A* dlse_p = dlse_c.defined() ? dlse_c.data_ptr<A>() : nullptr;
    const int64_t H = ms.H, L = ms.L, D = ms.D;
    parallel_for(ms.rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<A> g(D), tmp(D), scaled(D), w(n), g_dot(n);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L, i = row % L;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t lidx = (b * H + h) * L + i;
          const int64_t off = (row * H + h) * D;
          int64_t ld;
          const A* gd = load_rows<scalar_t>(dout_p + off, D, 1, D, g.data(), &ld);
          const A m = lse_p[lidx];
          const A dl = dlse_p ? dlse_p[lidx] : A(0);
          // dout . out is rebuilt from the partials in the accumulation type rather than
          // read from the (possibly bf16-rounded) merged output.
          A g_dot_out = 0;
          for (int k = 0; k < n; ++k) {
            const A lk = lp[k][lidx];
            w[k] = (m == neg_inf<A>() || lk == neg_inf<A>()) ? A(0) : std::exp(lk - m);
            const A* ok = load_rows<scalar_t>(op[k] + off, D, 1, D, tmp.data(), &ld);
            A acc = 0;
            for (int64_t d = 0; d < D; ++d) acc += gd[d] * ok[d];
            g_dot[k] = acc;
            g_dot_out += w[k] * acc;
          }
          for (int k = 0; k < n; ++k) {
            for (int64_t d = 0; d < D; ++d) scaled[d] = w[k] * gd[d];
            store_row<scalar_t>(scaled.data(), dop[k] + off, D);
            dlp[k][lidx] = w[k] * (g_dot[k] - g_dot_out + dl);
          }
        }
      }
    });
  });
  for (int k = 0; k < n; ++k) dlses[k] = dlses[k].to(lses[k].scalar_type());  // grads match inputs
  return {douts, dlses};
}

void merge_attention_inplace_cpu(const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& part_out, const at::Tensor& part_lse,
                                 int64_t row_start) {
  const MergeIntoShape ms = check_merge_into_args(out, lse, part_out, part_lse, row_start);
  const at::Tensor po = part_out.contiguous();
  const at::Tensor pl = part_lse.to(out.scalar_type()).contiguous();
  const auto st = po.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "longattn::merge_attention_", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* part = po.data_ptr<scalar_t>();
    const A* part_lse_p = pl.data_ptr<A>();
    A* run = out.data_ptr<A>();
    A* run_lse = lse.data_ptr<A>();
    const int64_t H = ms.H, L = ms.L, n = ms.n, D = ms.D;
    parallel_for(ms.outer * n, 16, [&](int64_t begin, int64_t end) {
      std::vector<A> tmp(D);
      for (int64_t row = begin; row < end; ++row) {  // row = b * n + i of the partial
        const int64_t b = row / n, i = row % n, run_row = b * L + row_start + i;
        for (int64_t h = 0; h < H; ++h) {
          A* lse_h = run_lse + (b * H + h) * L + row_start + i;
          const RunningMerge<A> m = running_merge<A>(*lse_h, part_lse_p[(b * H + h) * n + i]);
          *lse_h = m.lse;
          int64_t ld;
          const A* src = load_rows<scalar_t>(part + (row * H + h) * D, D, 1, D, tmp.data(), &ld);
          A* dst = run + (run_row * H + h) * D;
          if (m.reads_run()) {
            for (int64_t d = 0; d < D; ++d) dst[d] = m.apply(dst[d], src[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) dst[d] = m.apply(A(0), src[d]);
          }
        }
      }
    });
  });
}

}  // namespace longattn::cpu
