#include "kvcache_args.h"

#include <c10/util/Exception.h>

#include <string>

namespace longattn {
namespace {

void check_int_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
              "longattn: ", name, " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "longattn: ", name, " must be ", dim, "-D, got ", t.sizes());
}

void check_cache_pair(const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, op, ": k_cache and v_cache must be (batch, kv_heads, "
              "capacity, head_dim), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), op, ": k_cache and v_cache dtypes differ (",
              k.scalar_type(), " vs ", v.scalar_type(), ")");
  TORCH_CHECK(k.device() == v.device(), op, ": k_cache and v_cache devices differ");
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2), op,
              ": k_cache ", k.sizes(), " and v_cache ", v.sizes(), " disagree on batch, heads or "
              "capacity");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, op,
              ": the cache's head_dim must be contiguous (stride 1)");
}

// A per-slot tensor of the cache: (B, H, C) of `dtype` on the cache's device.
void check_slot_tensor(const char* op, const at::Tensor& t, const char* name,
                       at::ScalarType dtype, const at::Tensor& k_cache) {
  const int64_t B = k_cache.size(0), H = k_cache.size(1), C = k_cache.size(2);
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 3 && t.size(0) == B && t.size(1) == H &&
                  t.size(2) == C,
              op, ": ", name, " must be ", dtype, " (", B, ", ", H, ", ", C, "), got ",
              t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == k_cache.device(), op, ": ", name, " is on ", t.device(),
              ", the cache on ", k_cache.device());
}

// What decode checks the same way whatever holds the keys: the per-head lengths and the new
// queries' positions.
void check_rows(const char* op, const DecodeShape& s, const at::Tensor& q,
                const at::Tensor& lengths, const std::optional<at::Tensor>& q_positions) {
  check_int_tensor(lengths, "lengths", 2);
  TORCH_CHECK(lengths.size(0) == s.B && lengths.size(1) == s.Hkv, op, ": lengths must be (", s.B,
              ", ", s.Hkv, "), got ", lengths.sizes());
  TORCH_CHECK(lengths.device() == q.device(), op, ": lengths is on ", lengths.device(),
              ", q on ", q.device());
  if (q_positions.has_value()) {
    const auto& p = *q_positions;
    TORCH_CHECK(p.scalar_type() == at::kLong && p.dim() == 2 && p.size(0) == s.B &&
                    p.size(1) == s.n,
                op, ": q_positions must be int64 (", s.B, ", ", s.n, "), got ", p.scalar_type(),
                " ", p.sizes());
    TORCH_CHECK(p.device() == q.device(), op, ": q_positions on the wrong device");
  }
}

}  // namespace

DecodeShape check_decode_args(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& lengths,
                              const std::optional<at::Tensor>& positions,
                              const std::optional<at::Tensor>& q_positions,
                              const std::optional<at::Tensor>& scores) {
  constexpr const char* op = "longattn.decode_attention";
  check_cache_pair(k_cache, v_cache, op);
  TORCH_CHECK(q.dim() == 4, op, ": q must be (batch, q_heads, n_new, head_dim), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), op, ": q dtype ", q.scalar_type(),
              " differs from the cache's ", k_cache.scalar_type());
  TORCH_CHECK(q.device() == k_cache.device(), op, ": q is on ", q.device(), ", the cache on ",
              k_cache.device());
  DecodeShape s{};
  s.B = q.size(0); s.Hq = q.size(1); s.n = q.size(2); s.D = q.size(3);
  s.Hkv = k_cache.size(1); s.C = k_cache.size(2); s.Dv = v_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == s.B, op, ": q batch ", s.B, " vs cache batch ", k_cache.size(0));
  TORCH_CHECK(k_cache.size(3) == s.D, op, ": q head_dim ", s.D, " vs cache head_dim ",
              k_cache.size(3));
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, op, ": q heads (", s.Hq,
              ") must be a multiple of the cache's kv heads (", s.Hkv, ")");
  s.G = s.Hq / s.Hkv;
  check_rows(op, s, q, lengths, q_positions);
  if (positions.has_value()) check_slot_tensor(op, *positions, "positions", at::kLong, k_cache);
  if (scores.has_value()) check_slot_tensor(op, *scores, "scores", at::kFloat, k_cache);
  return s;
}

namespace {

// Pools (N, bs, Hp, D|Dv) of one dtype and device; Hp is 1 or the table's kv heads.
PagedShape check_pools(const char* op, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& block_table) {
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, op, ": k_pool and v_pool must be (num_blocks, "
              "block_size, kv_heads or 1, head_dim), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), op, ": k_pool and v_pool dtypes differ (",
              k.scalar_type(), " vs ", v.scalar_type(), ")");
  TORCH_CHECK(k.device() == v.device(), op, ": k_pool and v_pool devices differ");
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2), op,
              ": k_pool ", k.sizes(), " and v_pool ", v.sizes(), " disagree on blocks, block "
              "size or heads");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, op,
              ": the pools' head_dim must be contiguous (stride 1)");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 3, op,
              ": block_table must be int32 (batch, kv_heads, max_blocks), got ",
              block_table.scalar_type(), " ", block_table.sizes());
  TORCH_CHECK(block_table.device() == k.device(), op, ": block_table is on ",
              block_table.device(), ", the pools on ", k.device());
  const int64_t H = block_table.size(1);
  TORCH_CHECK(H > 0 && (k.size(2) == 1 || k.size(2) == H), op, ": the pools hold ", k.size(2),
              " heads per block; must be 1 (blocks per head) or the table's kv heads (", H, ")");
  TORCH_CHECK(k.size(1) > 0, op, ": block_size must be positive");
  return {k.size(0), k.size(1), k.size(2), block_table.size(2)};
}

// A per-slot tensor of a pool: (N, bs, Hp) of `dtype` on the pools' device.
void check_pool_slot_tensor(const char* op, const at::Tensor& t, const char* name,
                            at::ScalarType dtype, const at::Tensor& k_pool) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 3 && t.size(0) == k_pool.size(0) &&
                  t.size(1) == k_pool.size(1) && t.size(2) == k_pool.size(2),
              op, ": ", name, " must be ", dtype, " (", k_pool.size(0), ", ", k_pool.size(1),
              ", ", k_pool.size(2), ") like the pools, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == k_pool.device(), op, ": ", name, " is on ", t.device(),
              ", the pools on ", k_pool.device());
}

}  // namespace

DecodeShape check_paged_decode_args(const at::Tensor& q, const at::Tensor& k_pool,
                                    const at::Tensor& v_pool, const at::Tensor& block_table,
                                    const at::Tensor& lengths,
                                    const std::optional<at::Tensor>& positions,
                                    const std::optional<at::Tensor>& q_positions,
                                    const std::optional<at::Tensor>& scores, PagedShape* paged) {
  constexpr const char* op = "longattn.decode_attention_paged";
  *paged = check_pools(op, k_pool, v_pool, block_table);
  TORCH_CHECK(q.dim() == 4, op, ": q must be (batch, q_heads, n_new, head_dim), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type(), op, ": q dtype ", q.scalar_type(),
              " differs from the pools' ", k_pool.scalar_type());
  TORCH_CHECK(q.device() == k_pool.device(), op, ": q is on ", q.device(), ", the pools on ",
              k_pool.device());
  DecodeShape s{};
  s.B = q.size(0); s.Hq = q.size(1); s.n = q.size(2); s.D = q.size(3);
  s.Hkv = block_table.size(1); s.Dv = v_pool.size(3);
  s.C = paged->max_blocks * paged->block_size;
  TORCH_CHECK(block_table.size(0) == s.B, op, ": q batch ", s.B, " vs block_table batch ",
              block_table.size(0));
  TORCH_CHECK(k_pool.size(3) == s.D, op, ": q head_dim ", s.D, " vs the pool's ", k_pool.size(3));
  TORCH_CHECK(s.Hq % s.Hkv == 0, op, ": q heads (", s.Hq,
              ") must be a multiple of the table's kv heads (", s.Hkv, ")");
  s.G = s.Hq / s.Hkv;
  check_rows(op, s, q, lengths, q_positions);
  if (positions.has_value()) check_pool_slot_tensor(op, *positions, "positions", at::kLong, k_pool);
  if (scores.has_value()) check_pool_slot_tensor(op, *scores, "scores", at::kFloat, k_pool);
  return s;
}

kv::SlotStrides cache_slot_strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(2), t.stride(1)};
}

kv::SlotStrides pool_slot_strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.size(2) == 1 ? 0 : t.stride(2)};
}

kv::SlotMap paged_slot_map(const at::Tensor& block_table, const PagedShape& s) {
  kv::SlotMap m;
  m.table = block_table.const_data_ptr<int32_t>();
  m.tb = block_table.stride(0);
  m.th = block_table.stride(1);
  m.tj = block_table.stride(2);
  m.block_size = s.block_size;
  m.num_blocks = s.num_blocks;
  return m;
}

namespace {

// lengths (B, H), keep (B, H, n) and keep_lengths (B, H): int32 on the cache's device.
void check_keep_tensors(const char* op, const CompactShape& s, const at::Tensor& lengths,
                        const at::Tensor& keep, const at::Tensor& keep_lengths,
                        const at::Tensor& cache, const char* cache_name) {
  check_int_tensor(lengths, "lengths", 2);
  check_int_tensor(keep, "keep", 3);
  check_int_tensor(keep_lengths, "keep_lengths", 2);
  TORCH_CHECK(lengths.size(0) == s.B && lengths.size(1) == s.H, op, ": lengths must be (", s.B,
              ", ", s.H, "), got ", lengths.sizes());
  TORCH_CHECK(keep.size(0) == s.B && keep.size(1) == s.H, op, ": keep must be (", s.B, ", ", s.H,
              ", n), got ", keep.sizes());
  TORCH_CHECK(keep_lengths.size(0) == s.B && keep_lengths.size(1) == s.H, op,
              ": keep_lengths must be (", s.B, ", ", s.H, "), got ", keep_lengths.sizes());
  for (const auto* t : {&lengths, &keep, &keep_lengths}) {
    TORCH_CHECK(t->device() == cache.device(), op,
                ": index tensors must be on ", cache_name, " device");
  }
}

}  // namespace

CompactShape check_compact_paged_args(const at::Tensor& k_pool, const at::Tensor& v_pool,
                                      const std::optional<at::Tensor>& positions,
                                      const std::optional<at::Tensor>& scores,
                                      const at::Tensor& block_table, const at::Tensor& lengths,
                                      const at::Tensor& keep, const at::Tensor& keep_lengths,
                                      const std::optional<at::Tensor>& new_positions,
                                      const std::optional<at::Tensor>& inv_freq,
                                      int64_t rotary_dim, PagedShape* paged) {
  constexpr const char* op = "longattn.compact_paged_";
  *paged = check_pools(op, k_pool, v_pool, block_table);
  TORCH_CHECK(paged->Hp == 1, op, ": compaction needs blocks of one head each (pools of "
              "(num_blocks, block_size, 1, head_dim)), got ", paged->Hp, " heads per block");
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(block_table.size(d) <= 1 || block_table.stride(d) != 0, op,
                ": block_table is rewritten per (b, h): no broadcast (stride 0) dims");
  }
  CompactShape s{block_table.size(0), block_table.size(1),
                 paged->max_blocks * paged->block_size, 0};
  check_keep_tensors(op, s, lengths, keep, keep_lengths, k_pool, "the pools'");
  if (positions.has_value()) check_pool_slot_tensor(op, *positions, "positions", at::kLong, k_pool);
  if (scores.has_value()) check_pool_slot_tensor(op, *scores, "scores", at::kFloat, k_pool);
  s.K = keep.size(2);
  TORCH_CHECK(new_positions.has_value() == inv_freq.has_value(), op,
              ": new_positions and inv_freq come together (a rerotating compaction)");
  if (inv_freq.has_value()) {
    TORCH_CHECK(positions.has_value(), op, ": rerotating needs the keys' positions");
    check_rerotate_args(s, k_pool, *new_positions, *inv_freq, rotary_dim);
  }
  return s;
}

CompactShape check_compact_args(const char* op, const at::Tensor& k_cache,
                                const at::Tensor& v_cache,
                                const std::optional<at::Tensor>& positions,
                                const std::optional<at::Tensor>& scores, const at::Tensor& lengths,
                                const at::Tensor& keep, const at::Tensor& keep_lengths) {
  check_cache_pair(k_cache, v_cache, op);
  CompactShape s{k_cache.size(0), k_cache.size(1), k_cache.size(2), 0};
  check_keep_tensors(op, s, lengths, keep, keep_lengths, k_cache, "the cache's");
  if (positions.has_value()) check_slot_tensor(op, *positions, "positions", at::kLong, k_cache);
  if (scores.has_value()) check_slot_tensor(op, *scores, "scores", at::kFloat, k_cache);
  s.K = keep.size(2);
  return s;
}

void check_rerotate_args(const CompactShape& s, const at::Tensor& k_cache,
                         const at::Tensor& new_positions, const at::Tensor& inv_freq,
                         int64_t rotary_dim) {
  constexpr const char* op = "longattn.compact_rerotate_";
  TORCH_CHECK(new_positions.scalar_type() == at::kLong && new_positions.dim() == 3 &&
                  new_positions.size(0) == s.B && new_positions.size(1) == s.H &&
                  new_positions.size(2) == s.K,
              op, ": new_positions must be int64 (", s.B, ", ", s.H, ", ", s.K,
              ") like keep, got ", new_positions.scalar_type(), " ", new_positions.sizes());
  TORCH_CHECK(new_positions.device() == k_cache.device(), op, ": new_positions is on ",
              new_positions.device(), ", the cache on ", k_cache.device());
  TORCH_CHECK(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= k_cache.size(3), op,
              ": rotary_dim must be even and in [2, head_dim=", k_cache.size(3), "], got ",
              rotary_dim);
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.size(0) == rotary_dim / 2, op,
              ": inv_freq must be 1-D of length rotary_dim / 2 = ", rotary_dim / 2, ", got shape ",
              inv_freq.sizes());
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat || inv_freq.scalar_type() == at::kDouble, op,
              ": inv_freq must be float32 (or float64), got ", inv_freq.scalar_type());
  TORCH_CHECK(inv_freq.device() == k_cache.device() && inv_freq.is_contiguous(), op,
              ": inv_freq must be contiguous on the cache's device");
}

void raise_bad_length(const char* op, int64_t capacity, int64_t length) {
  TORCH_CHECK(false, op, ": lengths must lie in [0, ", capacity, "], got ", length);
}

void raise_bad_keep_length(const char* op, int64_t b, int64_t h, int64_t n, int64_t K) {
  TORCH_CHECK(false, op, ": keep_lengths[", b, ", ", h, "] = ", n, " outside [0, ", K, "]");
}

void raise_bad_block(const char* op, int64_t b, int64_t h, int64_t i, int64_t id,
                     int64_t num_blocks) {
  TORCH_CHECK(false, op, ": block_table[", b, ", ", h, ", ", i, "] = ", id, " names no block of "
              "the pool (", num_blocks, " blocks) but slots of that block are cached");
}

void raise_shared_block(const char* op, int64_t b, int64_t h, int64_t i, int64_t id) {
  TORCH_CHECK(false, op, ": block_table[", b, ", ", h, ", ", i, "] = ", id, " is also used by "
              "another cached block: a compaction moves rows in place, every block must belong "
              "to one (b, h)");
}

void raise_bad_keep(const char* op, int64_t b, int64_t h, int64_t length, int64_t j,
                    int64_t value, int64_t prev) {
  TORCH_CHECK(false, op, ": keep[", b, ", ", h, "] must be strictly ascending indices in "
              "[0, length=", length, "); entry ", j, " is ", value, j > 0 ? " after " : "",
              j > 0 ? std::to_string(prev) : std::string());
}

}  // namespace longattn
