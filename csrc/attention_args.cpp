#include "attention_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <string>

namespace longattn {
namespace {

void check_input(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t rank) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor");
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have ", rank,
                    " dims (", rank == 4 ? "batch, seqlen, heads, head_dim" : "tokens, heads, head_dim",
                    "), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(),
                    " but q has ", q.scalar_type(), "; q, k and v must share one dtype");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ",
                    q.device(), "; all tensors must be on one device");
  TORCH_CHECK_VALUE(t.stride(-1) == 1 || t.size(-1) == 1, name,
                    " must have a contiguous head dim (stride 1 on the last dim), got strides ",
                    t.strides());
}

// The contents of cu_seqlens are checked (and max_seqlen derived) on the host. On a GPU that
// is a copy and a synchronization per call, so there, as FlashAttention does, a call that gives
// max_seqlen_q/k is trusted instead: the table is read only with LONGATTN_DEBUG_CHECKS=1 (read
// once). Its metadata (dtype, shape, device) is always checked.
bool debug_checks() {
  static const bool on = [] {
    const char* env = std::getenv("LONGATTN_DEBUG_CHECKS");
    return env != nullptr && env[0] != '\0' && std::string(env) != "0";
  }();
  return on;
}

void check_cu_seqlens_meta(const at::Tensor& cu, const char* name, int64_t batch,
                           const at::Tensor& q) {
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) == batch + 1, name,
                    " must be 1-D of length batch + 1 = ", batch + 1, ", got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == q.device(), name, " is on ", cu.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(cu.is_contiguous(), name, " must be contiguous");
}

void check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t batch) {
  const at::Tensor host = cu.device().is_cpu() ? cu : cu.cpu();
  const int32_t* c = host.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0, name, "[0] must be 0, got ", c[0]);
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK_VALUE(c[i + 1] >= c[i], name, " must be non-decreasing, but ", name, "[", i + 1,
                      "] = ", c[i + 1], " < ", name, "[", i, "] = ", c[i]);
  }
  TORCH_CHECK_VALUE(c[batch] == total, name, "[-1] = ", c[batch],
                    " must equal the number of tokens ", total);
}

int64_t max_len(const at::Tensor& cu) {
  const at::Tensor host = cu.device().is_cpu() ? cu : cu.cpu();
  const int32_t* c = host.data_ptr<int32_t>();
  int64_t m = 0;
  for (int64_t i = 0; i + 1 < cu.size(0); ++i) m = std::max<int64_t>(m, c[i + 1] - c[i]);
  return m;
}

// max_seqlen_q/k are upper bounds of the longest sequence, as FlashAttention's varlen
// arguments; None derives them. The dense form has them in its shapes, so its callers pass None
// and no size has to become a Python int (a constant under torch.compile).
void check_seqlen_bound(const std::optional<int64_t>& bound, int64_t longest, const char* name,
                        const char* which) {
  TORCH_CHECK_VALUE(!bound || *bound >= longest, name, " = ", bound.value_or(0),
                    " is smaller than the longest ", which, " sequence (", longest, ")");
}

void check_per_head(const std::optional<at::Tensor>& t, const char* name, int64_t heads,
                    const at::Tensor& q, bool allow_fp64) {
  if (!t.has_value()) return;
  const bool fp64_ok = allow_fp64 && q.scalar_type() == at::kDouble && t->scalar_type() == at::kDouble;
  TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat || fp64_ok, name, " must be float32",
                    allow_fp64 ? " (or float64 with float64 q)" : "", ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == heads, name,
                    " must have shape (num_heads_q,) = (", heads, ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == q.device(), name, " is on ", t->device(), " but q is on ",
                    q.device());
  TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
}

void check_backward_args(const AttentionArgs& a, const at::Tensor& dout, const at::Tensor& out,
                         const at::Tensor& lse, const std::optional<at::Tensor>& dlse) {
  const at::Tensor& q = a.q;
  check_like_q(dout, q, "dout");
  check_like_q(out, q, "out");
  const auto lshape = lse_shape(a);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lshape) && lse.scalar_type() == lse_dtype(q),
                    "lse must be ", lse_dtype(q), " of shape ", at::IntArrayRef(lshape), ", got ",
                    lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ",
                    q.device());
  if (dlse.has_value()) {
    TORCH_CHECK_VALUE(dlse->sizes() == lse.sizes(), "dlse must have lse's shape ", lse.sizes(),
                      ", got ", dlse->sizes());
    TORCH_CHECK_VALUE(dlse->device() == q.device(), "dlse is on ", dlse->device(),
                      " but q is on ", q.device());
  }
}

}  // namespace

std::vector<int64_t> lse_shape(const AttentionArgs& a) {
  if (a.cu_seqlens_q.has_value()) return {a.q.size(1), a.q.size(0)};
  return {a.q.size(0), a.q.size(2), a.q.size(1)};
}

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), name, " must have q's shape ", q.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ",
                    q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on q's device ", q.device());
}

AttentionParams make_attention_params(const AttentionArgs& a) {
  const at::Tensor& q = a.q;
  const bool varlen = a.cu_seqlens_q.has_value() || a.cu_seqlens_k.has_value();
  TORCH_CHECK_VALUE(!varlen || (a.cu_seqlens_q.has_value() && a.cu_seqlens_k.has_value()),
                    "cu_seqlens_q and cu_seqlens_k must be given together");
  const auto st = q.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                    "q must be float32, float64, bfloat16 or float16, got ", st);
  const int64_t rank = varlen ? 3 : 4;
  check_input(q, "q", q, rank);
  check_input(a.k, "k", q, rank);
  check_input(a.v, "v", q, rank);
  TORCH_CHECK_VALUE(a.k.sizes() == a.v.sizes(), "k and v must have the same shape, got k ",
                    a.k.sizes(), " and v ", a.v.sizes());

  AttentionParams p;
  const int64_t D = q.size(-1);
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDim, "head_dim (last dim of q) must be in [1, ",
                    kMaxHeadDim, "], got ", D);
  TORCH_CHECK_VALUE(a.k.size(-1) == D, "k must have q's head_dim ", D, ", got ", a.k.size(-1));
  p.head_dim = D;
  p.heads_q = q.size(-2);
  p.heads_kv = a.k.size(-2);
  TORCH_CHECK_VALUE(p.heads_kv >= 1 && p.heads_q % p.heads_kv == 0,
                    "the number of q heads (", p.heads_q,
                    ") must be a multiple of the number of k/v heads (", p.heads_kv, ")");

  if (varlen) {
    p.batch = a.cu_seqlens_q->numel() - 1;
    TORCH_CHECK_VALUE(p.batch >= 0, "cu_seqlens_q must have at least one element");
    check_cu_seqlens_meta(*a.cu_seqlens_q, "cu_seqlens_q", p.batch, q);
    check_cu_seqlens_meta(*a.cu_seqlens_k, "cu_seqlens_k", p.batch, q);
    const bool trusted = !q.device().is_cpu() && a.max_seqlen_q && a.max_seqlen_k && !debug_checks();
    if (trusted) {
      // The bounds size the grid; each CTA reads its own sequence's length on the device.
      p.seqlen_q = *a.max_seqlen_q;
      p.seqlen_k = *a.max_seqlen_k;
    } else {
      check_cu_seqlens(*a.cu_seqlens_q, "cu_seqlens_q", q.size(0), p.batch);
      check_cu_seqlens(*a.cu_seqlens_k, "cu_seqlens_k", a.k.size(0), p.batch);
      p.seqlen_q = max_len(*a.cu_seqlens_q);
      p.seqlen_k = max_len(*a.cu_seqlens_k);
    }
    p.total_q = q.size(0);
    p.cu_seqlens_q = a.cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = a.cu_seqlens_k->data_ptr<int32_t>();
    p.q_row_stride = q.stride(0);
    p.q_head_stride = q.stride(1);
    p.k_row_stride = a.k.stride(0);
    p.k_head_stride = a.k.stride(1);
    p.v_row_stride = a.v.stride(0);
    p.v_head_stride = a.v.stride(1);
  } else {
    TORCH_CHECK_VALUE(a.k.size(0) == q.size(0), "k must have q's batch size ", q.size(0),
                      ", got ", a.k.size(0));
    p.batch = q.size(0);
    p.seqlen_q = q.size(1);
    p.seqlen_k = a.k.size(1);
    p.total_q = p.batch * p.seqlen_q;
    p.q_batch_stride = q.stride(0);
    p.q_row_stride = q.stride(1);
    p.q_head_stride = q.stride(2);
    p.k_batch_stride = a.k.stride(0);
    p.k_row_stride = a.k.stride(1);
    p.k_head_stride = a.k.stride(2);
    p.v_batch_stride = a.v.stride(0);
    p.v_row_stride = a.v.stride(1);
    p.v_head_stride = a.v.stride(2);
  }
  check_seqlen_bound(a.max_seqlen_q, p.seqlen_q, "max_seqlen_q", "q");
  check_seqlen_bound(a.max_seqlen_k, p.seqlen_k, "max_seqlen_k", "k");
  p.q = q.data_ptr();
  p.k = a.k.data_ptr();
  p.v = a.v.data_ptr();

  check_per_head(a.alibi_slopes, "alibi_slopes", p.heads_q, q, false);
  // fp64 sink logits with fp64 inputs keep float64 gradcheck of their gradient meaningful.
  check_per_head(a.sink_logits, "sink_logits", p.heads_q, q, true);
  if (a.alibi_slopes) p.alibi_slopes = a.alibi_slopes->data_ptr<float>();
  if (a.sink_logits) {
    p.sink_logits = a.sink_logits->data_ptr();
    p.sink_logits_fp64 = a.sink_logits->scalar_type() == at::kDouble;
  }

  TORCH_CHECK_VALUE(std::isfinite(a.scale) && a.scale > 0, "scale must be a positive finite number, got ",
                    a.scale);
  TORCH_CHECK_VALUE(std::isfinite(a.softcap) && a.softcap >= 0,
                    "softcap must be >= 0 (0 disables it), got ", a.softcap);
  TORCH_CHECK_VALUE(a.logn_base == 0 || (std::isfinite(a.logn_base) && a.logn_base > 1),
                    "logn_base must be > 1 (or 0 to disable), got ", a.logn_base);
  p.score.scale = a.scale;
  p.score.softcap = a.softcap;
  p.score.inv_log_logn_base = a.logn_base == 0 ? 0.0 : 1.0 / std::log(a.logn_base);
  p.score.has_alibi = a.alibi_slopes.has_value();
  p.score.has_sink_logit = a.sink_logits.has_value();

  const bool left_inf = a.window_left >= kUnbounded, right_inf = a.window_right >= kUnbounded;
  TORCH_CHECK_VALUE(a.window_left > -kUnbounded && a.window_right > -kUnbounded,
                    "window sides must be greater than -2**62");
  TORCH_CHECK_VALUE(left_inf || right_inf || a.window_left + a.window_right >= 0,
                    "window (left=", a.window_left, ", right=", a.window_right,
                    ") is empty: left + right must be >= 0");
  TORCH_CHECK_VALUE(a.sinks >= 0, "sinks must be >= 0, got ", a.sinks);
  TORCH_CHECK_VALUE(a.k_start >= 0, "k_start must be >= 0, got ", a.k_start);
  constexpr int64_t kMaxPos = int64_t(1) << 48;
  TORCH_CHECK_VALUE(a.k_start < kMaxPos && (!a.q_start || std::abs(*a.q_start) < kMaxPos),
                    "q_start/k_start must be below 2**48 in magnitude");
  p.mask.left = left_inf ? kUnbounded : a.window_left;
  p.mask.right = right_inf ? kUnbounded : a.window_right;
  p.mask.sinks = a.sinks;
  p.mask.causal = a.causal;
  p.mask.k_start = a.k_start;
  p.q_start_default = !a.q_start.has_value();
  p.mask.q_start = a.q_start.value_or(0);
  return p;
}

ForwardTensors make_forward_tensors(const AttentionArgs& a, AttentionParams* p) {
  ForwardTensors t;
  t.out = at::empty(a.q.sizes(), a.q.options());
  t.lse = at::empty(lse_shape(a), a.q.options().dtype(lse_dtype(a.q)));
  p->out = t.out.data_ptr();
  p->lse = t.lse.data_ptr();
  return t;
}

BackwardTensors prepare_backward(const AttentionArgs& a, AttentionParams* p, const at::Tensor& dout,
                                 const at::Tensor& out, const at::Tensor& lse,
                                 const std::optional<at::Tensor>& dlse) {
  check_backward_args(a, dout, out, lse, dlse);
  BackwardTensors t;
  t.dout = dout.contiguous();
  t.out = out.contiguous();
  t.lse = lse.contiguous();
  if (dlse.has_value()) t.dlse = dlse->to(lse_dtype(a.q)).contiguous();
  p->out = t.out.data_ptr();
  p->lse = t.lse.data_ptr();
  t.dq = at::empty(a.q.sizes(), a.q.options());
  t.dk = at::empty(a.k.sizes(), a.k.options());
  t.dv = at::empty(a.v.sizes(), a.v.options());
  t.dsink = a.sink_logits.has_value() ? at::empty({p->heads_q}, a.sink_logits->options())
                                      : at::empty({0}, a.q.options().dtype(at::kFloat));
  return t;
}

}  // namespace longattn
