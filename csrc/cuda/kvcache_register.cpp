// CUDA registrations of the KV-cache ops, contiguous and paged: the shared argument checks
// (kvcache_args.h), outputs and scratch, then the plain launches of cuda/kvcache/*.cu on the
// current stream.
//
// decode_attention(_paged) never reads values back to the host (a decode step stays
// asynchronous and capturable in a CUDA graph); a length outside [0, capacity], or a table entry
// naming no block for a cached slot, yields NaN rows for that head.
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

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// The per-slot tensors of a compaction, contiguous or paged (common/kv_slots.h).
void set_compact_cache(CompactParams& p, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& positions,
                       const std::optional<at::Tensor>& scores, bool paged) {
  auto strides = [&](const at::Tensor& t) {
    return paged ? pool_slot_strides(t) : cache_slot_strides(t);
  };
  p.ks = strides(k);
  p.vs = strides(v);
  if (positions.has_value()) {
    p.positions = positions->data_ptr<int64_t>();
    p.ps = strides(*positions);
  }
  if (scores.has_value()) {
    p.scores = scores->data_ptr<float>();
    p.ss = strides(*scores);
  }
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
  p.ks = cache_slot_strides(k_cache);
  p.vs = cache_slot_strides(v_cache);
  if (positions.has_value()) {
    p.positions = positions->const_data_ptr<int64_t>();
    p.ps = cache_slot_strides(*positions);
  }
  if (scores.has_value()) {
    p.scores = scores->data_ptr<float>();
    p.ss = cache_slot_strides(*scores);
  }
  return run_decode(p, sh, q, lengths, q_positions, scale, window, sinks);
}

// The compaction once p holds the cache (k, v, slots, positions, scores, the rotation): scratch,
// the launch, then the statuses read back (a synchronization) and the CPU's errors raised for
// the first bad (b, h) in order, keep lists before tables as on the CPU; nothing moved then.
void compact_impl(const char* op, CompactParams p, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& lengths, const at::Tensor& keep,
                  const at::Tensor& keep_lengths, const CompactShape& sh,
                  const at::Tensor* block_table) {
  TORCH_CHECK(sh.K < std::numeric_limits<int32_t>::max(), op, ": keep is too wide (", sh.K, ")");
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor keep_c = keep.to(at::kLong).contiguous();
  const at::Tensor kl_c = keep_lengths.to(at::kLong).contiguous();
  p.B = sh.B; p.H = sh.H; p.C = sh.C; p.K = sh.K;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.D = k.size(3);
  p.Dv = v.size(3);
  p.keep = keep_c.const_data_ptr<int64_t>();
  p.keep_lengths = kl_c.const_data_ptr<int64_t>();
  p.lengths = lengths_of(lengths);
  at::Tensor new_table;
  if (block_table != nullptr) {
    new_table = at::empty(block_table->sizes(), block_table->options());
    p.new_table = new_table.data_ptr<int32_t>();
  }
  const KernelDtype dtype = kernel_dtype_of(k.scalar_type(), op, "k_cache");
  at::Tensor scratch = at::empty({compact_scratch_size(p, dtype)}, keep_c.options().dtype(at::kInt));
  p.scratch = scratch.data_ptr<int32_t>();
  C10_CUDA_CHECK(launch_compact(p, dtype, stream_of(k)));

  const int64_t bh = sh.B * sh.H;
  const at::Tensor st = scratch.narrow(0, 0, 2 * bh).cpu();
  const int32_t* s = st.const_data_ptr<int32_t>();
  for (int64_t x = 0; x < bh; ++x) {
    if (s[x] == kKeepOk) continue;
    const int64_t b = x / sh.H, h = x % sh.H;
    const int64_t L = lengths[b][h].item<int64_t>();
    if (s[x] == kBadLength) raise_bad_length(op, sh.C, L);
    if (s[x] == kBadKeepLength) raise_bad_keep_length(op, b, h, kl_c[b][h].item<int64_t>(), sh.K);
    const int64_t j = s[x];
    raise_bad_keep(op, b, h, L, j, keep_c[b][h][j].item<int64_t>(),
                   j > 0 ? keep_c[b][h][j - 1].item<int64_t>() : -1);
  }
  for (int64_t x = 0; x < bh; ++x) {
    const int32_t bs = s[bh + x];
    if (bs == kKeepOk) continue;
    const int64_t b = x / sh.H, h = x % sh.H, i = bs / 2;
    const int64_t id = (*block_table)[b][h][i].item<int64_t>();
    if (bs % 2 == 0) raise_bad_block(op, b, h, i, id, p.slots.num_blocks);
    raise_shared_block(op, b, h, i, id);
  }
  if (block_table != nullptr) block_table->copy_(new_table);
  lengths.copy_(kl_c);
}

void compact_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& positions,
                  const std::optional<at::Tensor>& scores, const at::Tensor& lengths,
                  const at::Tensor& keep, const at::Tensor& keep_lengths) {
  constexpr const char* op = "longattn.compact_";
  const CompactShape sh = check_compact_args(op, k_cache, v_cache, positions, scores, lengths,
                                             keep, keep_lengths);
  CompactParams p;
  set_compact_cache(p, k_cache, v_cache, positions, scores, false);
  compact_impl(op, p, k_cache, v_cache, lengths, keep, keep_lengths, sh, nullptr);
}

void set_rotation(CompactParams& p, const at::Tensor& new_positions, const at::Tensor& inv_freq,
                  int64_t rotary_dim, bool interleaved) {
  p.new_positions = new_positions.const_data_ptr<int64_t>();
  for (int d = 0; d < 3; ++d) p.ns[d] = new_positions.stride(d);
  p.inv_freq = inv_freq.const_data_ptr();
  p.inv_freq_fp64 = inv_freq.scalar_type() == at::kDouble;
  p.rotary_dim = rotary_dim;
  p.interleaved = interleaved;
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
  set_compact_cache(p, k_cache, v_cache, positions, scores, false);
  set_rotation(p, new_positions, inv_freq, rotary_dim, interleaved);
  compact_impl(op, p, k_cache, v_cache, lengths, keep, keep_lengths, sh, nullptr);
}

std::tuple<at::Tensor, at::Tensor> decode_attention_paged_cuda(
    const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
    const at::Tensor& block_table, const at::Tensor& lengths,
    const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& q_positions,
    double scale, int64_t window, int64_t sinks, const std::optional<at::Tensor>& scores) {
  PagedShape ps{};
  const DecodeShape sh = check_paged_decode_args(q, k_pool, v_pool, block_table, lengths,
                                                 positions, q_positions, scores, &ps);
  DecodeParams p;
  p.k = k_pool.const_data_ptr();
  p.v = v_pool.const_data_ptr();
  p.slots = paged_slot_map(block_table, ps);
  p.ks = pool_slot_strides(k_pool);
  p.vs = pool_slot_strides(v_pool);
  if (positions.has_value()) {
    p.positions = positions->const_data_ptr<int64_t>();
    p.ps = pool_slot_strides(*positions);
  }
  if (scores.has_value()) {
    p.scores = scores->data_ptr<float>();
    p.ss = pool_slot_strides(*scores);
  }
  return run_decode(p, sh, q, lengths, q_positions, scale, window, sinks);
}

void compact_paged_cuda(const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const std::optional<at::Tensor>& positions,
                        const std::optional<at::Tensor>& scores, const at::Tensor& block_table,
                        const at::Tensor& lengths, const at::Tensor& keep,
                        const at::Tensor& keep_lengths,
                        const std::optional<at::Tensor>& new_positions,
                        const std::optional<at::Tensor>& inv_freq, int64_t rotary_dim,
                        bool interleaved) {
  constexpr const char* op = "longattn.compact_paged_";
  PagedShape ps{};
  const CompactShape sh =
      check_compact_paged_args(k_pool, v_pool, positions, scores, block_table, lengths, keep,
                               keep_lengths, new_positions, inv_freq, rotary_dim, &ps);
  CompactParams p;
  set_compact_cache(p, k_pool, v_pool, positions, scores, true);
  p.slots = paged_slot_map(block_table, ps);
  if (inv_freq.has_value()) set_rotation(p, *new_positions, *inv_freq, rotary_dim, interleaved);
  compact_impl(op, p, k_pool, v_pool, lengths, keep, keep_lengths, sh, &block_table);
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("compact_", &compact_cuda);
  m.impl("compact_rerotate_", &compact_rerotate_cuda);
  m.impl("decode_attention_paged", &decode_attention_paged_cuda);
  m.impl("compact_paged_", &compact_paged_cuda);
}

}  // namespace longattn::cuda
