// CUDA registrations of the KV-cache ops: the shared argument checks (kvcache_args.h), outputs
// and scratch, then the plain launches of cuda/kvcache/*.cu on the current stream.
//
// decode_attention never reads values back to the host (a decode step stays asynchronous and
// capturable in a CUDA graph); a length outside [0, capacity] yields NaN rows for that head.
// compact_ / compact_rerotate_ read the validation kernel's per-head status back (one small
// device-to-host copy, a synchronization) to raise the same errors as the CPU; when a list is
// bad nothing has moved.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one wants cuSPARSE headers
#include <torch/library.h>

#include <limits>

#include "common/kvcache_math.h"
#include "cuda/kernel_dtype_of.h"
#include "cuda/kvcache/kvcache_launch.h"
#include "kvcache_args.h"

namespace longattn::cuda {
namespace {

KvLengths lengths_of(const at::Tensor& l) {
  return {l.const_data_ptr(), l.scalar_type() == at::kLong, l.stride(0), l.stride(1)};
}

void strides3(const at::Tensor& t, int64_t (&s)[3]) {
  for (int d = 0; d < 3; ++d) s[d] = t.stride(d);
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

kv::SlotStrides cache_strides(const at::Tensor& t) {  // (B, H, C, ...): x = b, y = slot
  return {t.stride(0), t.stride(2), t.stride(1)};
}

// The decode launch once p holds the cache (k, v, slots, positions, scores and their strides):
// outputs, scratch sized by the plan (decode_scratch), the launch on q's stream.
std::tuple<at::Tensor, at::Tensor> run_decode(DecodeParams& p, const DecodeShape& sh,
                                              const at::Tensor& q, const at::Tensor& lengths,
                                              const std::optional<at::Tensor>& q_positions,
                                              double scale, int64_t window, int64_t sinks) {
  constexpr const char* op = "longattn.decode_attention";
  TORCH_CHECK(sh.D <= kMaxDecodeHeadDim && sh.Dv <= kMaxDecodeHeadDim, op,
              ": head dims up to ", kMaxDecodeHeadDim, " on CUDA, got ", sh.D, " and ", sh.Dv);
  TORCH_CHECK(sh.B <= 65535 && sh.Hkv <= 65535, op, ": batch and kv heads up to 65535 on CUDA");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({sh.B, sh.Hq, sh.n, sh.Dv}, q.options());
  at::Tensor lse = at::empty({sh.B, sh.Hq, sh.n}, q.options().dtype(acc));
  if (sh.B * sh.Hq * sh.n == 0) return {out, lse};

  const at::Tensor qc = q.contiguous();
  p.B = sh.B; p.Hq = sh.Hq; p.Hkv = sh.Hkv; p.G = sh.G; p.n = sh.n;
  p.D = sh.D; p.Dv = sh.Dv; p.C = sh.C;
  p.scale = scale; p.window = window; p.sinks = sinks;
  p.q = qc.const_data_ptr();
  p.lengths = lengths_of(lengths);
  if (q_positions.has_value()) {
    p.q_positions = q_positions->const_data_ptr<int64_t>();
    p.qps[0] = q_positions->stride(0);
    p.qps[1] = q_positions->stride(1);
  }
  const KernelDtype dtype = kernel_dtype_of(q.scalar_type(), op, "q");
  const DecodeScratch sz = decode_scratch(p, dtype);
  const auto acc_opts = q.options().dtype(acc);
  at::Tensor part_out = at::empty({sz.part_out}, acc_opts);
  at::Tensor part_lse = at::empty({sz.part_lse}, acc_opts);
  at::Tensor logits = at::empty({sz.logits}, acc_opts);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.part_out = part_out.data_ptr();
  p.part_lse = part_lse.data_ptr();
  p.logits = sz.logits > 0 ? logits.data_ptr() : nullptr;
  C10_CUDA_CHECK(launch_decode(p, dtype, stream_of(q)));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& lengths, const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& q_positions, double scale, int64_t window, int64_t sinks,
    const std::optional<at::Tensor>& scores) {
  const DecodeShape sh = check_decode_args(q, k_cache, v_cache, lengths, positions, q_positions,
                                           scores);
  DecodeParams p;
  p.k = k_cache.const_data_ptr();
  p.v = v_cache.const_data_ptr();
  p.ks = cache_strides(k_cache);
  p.vs = cache_strides(v_cache);
  if (positions.has_value()) {
    p.positions = positions->const_data_ptr<int64_t>();
    p.ps = cache_strides(*positions);
  }
  if (scores.has_value()) {
    p.scores = scores->data_ptr<float>();
    p.ss = cache_strides(*scores);
  }
  return run_decode(p, sh, q, lengths, q_positions, scale, window, sinks);
}

void compact_impl(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& positions,
                  const std::optional<at::Tensor>& scores, const at::Tensor& lengths,
                  const at::Tensor& keep, const at::Tensor& keep_lengths, const CompactShape& sh,
                  CompactParams p) {
  TORCH_CHECK(sh.K < std::numeric_limits<int32_t>::max(), op, ": keep is too wide (", sh.K, ")");
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const at::Tensor keep_c = keep.to(at::kLong).contiguous();
  const at::Tensor kl_c = keep_lengths.to(at::kLong).contiguous();
  at::Tensor status = at::empty({sh.B * sh.H + 1}, keep_c.options().dtype(at::kInt));
  at::Tensor shifts;
  if (p.new_positions != nullptr) shifts = at::empty({sh.B * sh.H * sh.K}, keep_c.options());

  p.B = sh.B; p.H = sh.H; p.C = sh.C; p.K = sh.K;
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.D = k_cache.size(3);
  p.Dv = v_cache.size(3);
  strides3(k_cache, p.ks);
  strides3(v_cache, p.vs);
  if (positions.has_value()) {
    p.positions = positions->data_ptr<int64_t>();
    strides3(*positions, p.ps);
  }
  if (scores.has_value()) {
    p.scores = scores->data_ptr<float>();
    strides3(*scores, p.ss);
  }
  p.keep = keep_c.const_data_ptr<int64_t>();
  p.keep_lengths = kl_c.const_data_ptr<int64_t>();
  p.lengths = lengths_of(lengths);
  p.status = status.data_ptr<int32_t>();
  p.error_flag = p.status + sh.B * sh.H;
  p.shifts = shifts.defined() ? shifts.data_ptr<int64_t>() : nullptr;
  C10_CUDA_CHECK(launch_compact(p, kernel_dtype_of(k_cache.scalar_type(), op, "k_cache"),
                                stream_of(k_cache)));

  // The first bad (b, h) in order, reported as the CPU does (nothing moved on the device).
  const at::Tensor st = status.narrow(0, 0, sh.B * sh.H).cpu();
  const int32_t* s = st.const_data_ptr<int32_t>();
  for (int64_t x = 0; x < sh.B * sh.H; ++x) {
    if (s[x] == kKeepOk) continue;
    const int64_t b = x / sh.H, h = x % sh.H;
    const int64_t L = lengths[b][h].item<int64_t>();
    if (s[x] == kBadLength) raise_bad_length(op, sh.C, L);
    if (s[x] == kBadKeepLength) raise_bad_keep_length(op, b, h, kl_c[b][h].item<int64_t>(), sh.K);
    const int64_t j = s[x];
    raise_bad_keep(op, b, h, L, j, keep_c[b][h][j].item<int64_t>(),
                   j > 0 ? keep_c[b][h][j - 1].item<int64_t>() : -1);
  }
  lengths.copy_(kl_c);
}

void compact_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& positions,
                  const std::optional<at::Tensor>& scores, const at::Tensor& lengths,
                  const at::Tensor& keep, const at::Tensor& keep_lengths) {
  constexpr const char* op = "longattn.compact_";
  const CompactShape sh = check_compact_args(op, k_cache, v_cache, positions, scores, lengths,
                                             keep, keep_lengths);
  compact_impl(op, k_cache, v_cache, positions, scores, lengths, keep, keep_lengths, sh, {});
}

void compact_rerotate_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& positions, const std::optional<at::Tensor>& scores,
                           const at::Tensor& lengths, const at::Tensor& keep,
                           const at::Tensor& keep_lengths, const at::Tensor& new_positions,
                           const at::Tensor& inv_freq, int64_t rotary_dim, bool interleaved) {
  constexpr const char* op = "longattn.compact_rerotate_";
  const CompactShape sh = check_compact_args(op, k_cache, v_cache, positions, scores, lengths,
                                             keep, keep_lengths);
  check_rerotate_args(sh, k_cache, new_positions, inv_freq, rotary_dim);
  CompactParams p;
  p.new_positions = new_positions.const_data_ptr<int64_t>();
  strides3(new_positions, p.ns);
  p.inv_freq = inv_freq.const_data_ptr();
  p.inv_freq_fp64 = inv_freq.scalar_type() == at::kDouble;
  p.rotary_dim = rotary_dim;
  p.interleaved = interleaved;
  compact_impl(op, k_cache, v_cache, positions, scores, lengths, keep, keep_lengths, sh, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("compact_", &compact_cuda);
  m.impl("compact_rerotate_", &compact_rerotate_cuda);
}

}  // namespace longattn::cuda
