#include "rope_args.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace longattn {
namespace {

const char* layout_name(int64_t rank) {
  return rank == 4 ? "(batch, seqlen, heads, head_dim)" : "(tokens, heads, head_dim)";
}

void check_head_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.stride(-1) == 1 || t.size(-1) <= 1 || t.numel() == 0, name,
                    " must have a contiguous head dim (stride 1 on the last dim), got strides ",
                    t.strides());
}

void check_x(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor");
  TORCH_CHECK_VALUE(t.dim() == 4 || t.dim() == 3, name, " must be ", layout_name(4), " or ",
                    layout_name(3), ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.dim() == q.dim(), name, " must have q's layout ", layout_name(q.dim()),
                    ", got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                    name, " must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(st == q.scalar_type(), name, " has dtype ", st, " but q has ",
                    q.scalar_type(), "; q and k must share one dtype");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ",
                    q.device());
  check_head_dim_contiguous(t, name);
}

// Element strides of the batch, token and head dims ((T, H, D): batch stride 0).
void token_strides(const at::Tensor& t, int64_t* stride_b, int64_t* stride_l, int64_t* stride_h) {
  *stride_b = t.dim() == 4 ? t.stride(0) : 0;
  *stride_l = t.stride(t.dim() - 3);
  *stride_h = t.stride(-2);
}

// The forward's input `saved` next to its incoming gradient: same shape, dtype and device.
void set_saved(RopeTensor& v, const at::Tensor& saved, const char* name, const at::Tensor& grad,
               const char* grad_name) {
  TORCH_CHECK_VALUE(saved.sizes() == grad.sizes(), name, " has shape ", saved.sizes(), " but ",
                    grad_name, " has ", grad.sizes(), "; they must match");
  TORCH_CHECK_VALUE(saved.scalar_type() == grad.scalar_type(), name, " has dtype ",
                    saved.scalar_type(), " but ", grad_name, " has ", grad.scalar_type());
  TORCH_CHECK_VALUE(saved.device() == grad.device(), name, " is on ", saved.device(), " but ",
                    grad_name, " is on ", grad.device());
  check_head_dim_contiguous(saved, name);
  v.saved = saved.data_ptr();
  token_strides(saved, &v.saved_stride_b, &v.saved_stride_l, &v.saved_stride_h);
}

RopeTensor view_of(const at::Tensor& t) {
  RopeTensor v;
  v.in = t.data_ptr();
  v.heads = t.size(-2);
  v.head_dim = t.size(-1);
  token_strides(t, &v.in_stride_b, &v.in_stride_l, &v.in_stride_h);
  return v;
}

}  // namespace

RopeParams make_rope_params(const at::Tensor& q, const std::optional<at::Tensor>& k,
                            const at::Tensor& positions, const at::Tensor& inv_freq,
                            double attention_scaling, int64_t rotary_dim, bool interleaved,
                            bool inverse) {
  check_x(q, "q", q);
  if (k.has_value()) {
    check_x(*k, "k", q);
    const int64_t lead = q.dim() - 2;
    TORCH_CHECK_VALUE(k->sizes().slice(0, lead) == q.sizes().slice(0, lead),
                      "k must have q's leading dims ", q.sizes().slice(0, lead),
                      " (only heads and head_dim may differ), got shape ", k->sizes());
  }
  const int64_t min_head_dim = k.has_value() ? std::min(q.size(-1), k->size(-1)) : q.size(-1);
  TORCH_CHECK_VALUE(rotary_dim >= 2 && rotary_dim % 2 == 0,
                    "rotary_dim must be even and >= 2, got ", rotary_dim);
  TORCH_CHECK_VALUE(rotary_dim <= min_head_dim, "rotary_dim = ", rotary_dim,
                    " is larger than head_dim = ", min_head_dim);

  TORCH_CHECK_VALUE(inv_freq.defined() && inv_freq.dim() == 1 && inv_freq.size(0) == rotary_dim / 2,
                    "inv_freq must be 1-D of length rotary_dim / 2 = ", rotary_dim / 2,
                    ", got shape ", inv_freq.sizes());
  TORCH_CHECK_VALUE(inv_freq.scalar_type() == at::kFloat || inv_freq.scalar_type() == at::kDouble,
                    "inv_freq must be float32 (or float64), got ", inv_freq.scalar_type());
  TORCH_CHECK_VALUE(inv_freq.device() == q.device(), "inv_freq is on ", inv_freq.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(inv_freq.is_contiguous(), "inv_freq must be contiguous");

  TORCH_CHECK_VALUE(positions.defined() && (positions.scalar_type() == at::kInt ||
                                            positions.scalar_type() == at::kLong),
                    "positions must be int32 or int64, got ",
                    positions.defined() ? c10::toString(positions.scalar_type()) : "undefined");
  TORCH_CHECK_VALUE(positions.device() == q.device(), "positions is on ", positions.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(std::isfinite(attention_scaling), "attention_scaling must be finite, got ",
                    attention_scaling);

  RopeParams p;
  if (q.dim() == 4) {
    p.batch = q.size(0);
    p.seqlen = q.size(1);
    const bool ok = (positions.dim() == 1 && positions.size(0) == p.seqlen) ||
                    (positions.dim() == 2 && positions.size(1) == p.seqlen &&
                     (positions.size(0) == p.batch || positions.size(0) == 1));
    TORCH_CHECK_VALUE(ok, "positions must have shape (batch, seqlen) = (", p.batch, ", ", p.seqlen,
                      "), (1, seqlen) or (seqlen,) for q of shape ", q.sizes(), ", got ",
                      positions.sizes());
    if (positions.dim() == 2) {
      p.pos_stride_b = positions.size(0) == 1 ? 0 : positions.stride(0);
      p.pos_stride_l = positions.stride(1);
    } else {
      p.pos_stride_l = positions.stride(0);
    }
  } else {
    p.batch = 1;
    p.seqlen = q.size(0);
    TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == p.seqlen,
                      "positions must have shape (tokens,) = (", p.seqlen, ",) for q of shape ",
                      q.sizes(), ", got ", positions.sizes());
    p.pos_stride_l = positions.stride(0);
  }
  p.positions = positions.data_ptr();
  p.positions_int64 = positions.scalar_type() == at::kLong;
  p.inv_freq = inv_freq.data_ptr();
  p.inv_freq_fp64 = inv_freq.scalar_type() == at::kDouble;
  p.rotary_dim = rotary_dim;
  p.scaling = attention_scaling;
  p.interleaved = interleaved;
  p.inverse = inverse;
  p.x[0] = view_of(q);
  p.n_tensors = 1;
  if (k.has_value()) {
    p.x[1] = view_of(*k);
    p.n_tensors = 2;
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> allocate_rope_outputs(RopeParams& p, const at::Tensor& q,
                                                         const std::optional<at::Tensor>& k) {
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = k.has_value() ? at::empty(k->sizes(), k->options()) : at::empty({0}, q.options());
  const at::Tensor* outs[2] = {&q_out, &k_out};
  for (int i = 0; i < p.n_tensors; ++i) {
    RopeTensor& v = p.x[i];
    const at::Tensor& o = *outs[i];
    v.out = o.data_ptr();
    v.out_stride_h = v.head_dim;
    v.out_stride_l = v.heads * v.head_dim;
    v.out_stride_b = p.seqlen * v.out_stride_l;
  }
  p.copy_tail = true;
  return {q_out, k_out};
}

std::tuple<RopeParams, at::Tensor, at::Tensor, at::Tensor> make_rope_backward(
    const at::Tensor& dq_out, const std::optional<at::Tensor>& dk_out, const at::Tensor& q,
    const std::optional<at::Tensor>& k, const at::Tensor& positions, const at::Tensor& inv_freq,
    double attention_scaling, int64_t rotary_dim, bool interleaved, bool inverse,
    bool input_grads) {
  TORCH_CHECK_VALUE(k.has_value() == dk_out.has_value(),
                    "rope_backward: k and dk_out must be given together (got k ",
                    k.has_value() ? "set" : "None", ", dk_out ", dk_out.has_value() ? "set" : "None",
                    ")");
  RopeParams p = make_rope_params(dq_out, dk_out, positions, inv_freq, attention_scaling,
                                  rotary_dim, interleaved, !inverse);
  set_saved(p.x[0], q, "q", dq_out, "dq_out");
  if (k.has_value()) set_saved(p.x[1], *k, "k", *dk_out, "dk_out");
  at::Tensor dq, dk;
  if (input_grads) {
    std::tie(dq, dk) = allocate_rope_outputs(p, dq_out, dk_out);
  } else {
    dq = at::empty({0}, dq_out.options());
    dk = at::empty({0}, dq_out.options());
    p.copy_tail = false;  // out stays null: only the inv_freq gradient is computed
  }
  at::Tensor dinv_freq = at::empty(inv_freq.sizes(), inv_freq.options());
  p.grad_inv_freq = dinv_freq.data_ptr();
  return {p, dq, dk, dinv_freq};
}

void set_rope_inplace(RopeParams& p, const at::Tensor& q, const std::optional<at::Tensor>& k) {
  // A token's heads are read and written by one thread: a view that aliases itself (an
  // expanded dim) or k aliasing q would be written twice with different results.
  // (Views whose overlap torch cannot decide, e.g. q and k slices of one fused qkv buffer,
  // are accepted, as torch's own in-place ops do.)
  TORCH_CHECK_VALUE(at::has_internal_overlap(q) != at::MemOverlap::Yes,
                    "in-place rope: q has elements that share memory (an expanded view)");
  if (k.has_value()) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*k) != at::MemOverlap::Yes,
                      "in-place rope: k has elements that share memory (an expanded view)");
    const auto status = at::get_overlap_status(q, *k);
    TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                      "in-place rope: q and k overlap in memory");
  }
  for (int i = 0; i < p.n_tensors; ++i) {
    RopeTensor& v = p.x[i];
    v.out = const_cast<void*>(v.in);
    v.out_stride_b = v.in_stride_b;
    v.out_stride_l = v.in_stride_l;
    v.out_stride_h = v.in_stride_h;
  }
  p.copy_tail = false;
}

}  // namespace longattn
