// Argument checks of the KV-cache ops shared by every backend: shapes, dtypes and devices of
// decode_attention, compact_ and compact_rerotate_, with errors naming the argument. What
// depends on the values (lengths in range, keep lists sorted) each backend checks where the
// values live: the CPU on the host, CUDA in a validation kernel whose findings are reported
// by the messages below.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "common/kv_slots.h"

namespace longattn {

struct DecodeShape {
  int64_t B, Hq, Hkv, G, n, D, Dv, C;
};

// q (B, Hq, n, D) over k/v caches (B, Hkv, C, D|Dv); lengths (B, Hkv) int32/int64;
// positions (B, Hkv, C) int64; q_positions (B, n) int64; scores (B, Hkv, C) fp32.
DecodeShape check_decode_args(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& lengths,
                              const std::optional<at::Tensor>& positions,
                              const std::optional<at::Tensor>& q_positions,
                              const std::optional<at::Tensor>& scores);

// The paged layout (common/kv_slots.h): pools (num_blocks, block_size, Hp, D), Hp 1 (every
// (b, h) owns its blocks) or Hkv (a block holds every head of a sequence), behind a block table
// (B, Hkv, max_blocks) int32; capacity max_blocks * block_size slots per (b, h).
struct PagedShape {
  int64_t num_blocks, block_size, Hp, max_blocks;
};

// decode_attention_paged: q (B, Hq, n, D) over pools k (N, bs, Hp, D) / v (N, bs, Hp, Dv) through
// block_table (B, Hkv, M) int32; lengths (B, Hkv); positions (N, bs, Hp) int64; q_positions
// (B, n) int64; scores (N, bs, Hp) fp32. DecodeShape::C is M * bs.
DecodeShape check_paged_decode_args(const at::Tensor& q, const at::Tensor& k_pool,
                                    const at::Tensor& v_pool, const at::Tensor& block_table,
                                    const at::Tensor& lengths,
                                    const std::optional<at::Tensor>& positions,
                                    const std::optional<at::Tensor>& q_positions,
                                    const std::optional<at::Tensor>& scores, PagedShape* paged);

// Slot addressing of either layout (common/kv_slots.h) from the tensors.
kv::SlotStrides cache_slot_strides(const at::Tensor& t);  // (B, H, C, ...): x = b, y = slot
kv::SlotStrides pool_slot_strides(const at::Tensor& t);   // (N, bs, Hp, ...): x = block, y = row
kv::SlotMap paged_slot_map(const at::Tensor& block_table, const PagedShape& s);

struct CompactShape {
  int64_t B, H, C, K;  // K: the width of keep (entries past keep_lengths are ignored)
};

CompactShape check_compact_args(const char* op, const at::Tensor& k_cache,
                                const at::Tensor& v_cache,
                                const std::optional<at::Tensor>& positions,
                                const std::optional<at::Tensor>& scores, const at::Tensor& lengths,
                                const at::Tensor& keep, const at::Tensor& keep_lengths);

// compact_rerotate_: new_positions (B, H, K) int64 (any strides); inv_freq 1-D fp32/fp64 of
// rotary_dim / 2 entries, contiguous; rotary_dim even, in [2, head_dim].
void check_rerotate_args(const CompactShape& s, const at::Tensor& k_cache,
                         const at::Tensor& new_positions, const at::Tensor& inv_freq,
                         int64_t rotary_dim);

// compact_paged_: the pools of per-(b, h) blocks (Hp = 1), block_table (B, H, M) int32 written
// in place, and the compaction's keep lists as compact_ (K = keep.size(2)); with inv_freq, the
// rotation arguments of compact_rerotate_ (positions and new_positions then required).
CompactShape check_compact_paged_args(const at::Tensor& k_pool, const at::Tensor& v_pool,
                                      const std::optional<at::Tensor>& positions,
                                      const std::optional<at::Tensor>& scores,
                                      const at::Tensor& block_table, const at::Tensor& lengths,
                                      const at::Tensor& keep, const at::Tensor& keep_lengths,
                                      const std::optional<at::Tensor>& new_positions,
                                      const std::optional<at::Tensor>& inv_freq,
                                      int64_t rotary_dim, PagedShape* paged);

// The first bad (b, h) of a compaction, as either backend found it: raise the error.
[[noreturn]] void raise_bad_length(const char* op, int64_t capacity, int64_t length);
[[noreturn]] void raise_bad_keep_length(const char* op, int64_t b, int64_t h, int64_t n,
                                        int64_t K);
// entry j of keep[b, h] is `value` (and follows `prev` when j > 0).
[[noreturn]] void raise_bad_keep(const char* op, int64_t b, int64_t h, int64_t length, int64_t j,
                                 int64_t value, int64_t prev);
// Paged: entry i of block_table[b, h], needed for a cached slot, names no block of the pool;
// or (compaction) names a block another head or slot range also uses.
[[noreturn]] void raise_bad_block(const char* op, int64_t b, int64_t h, int64_t i, int64_t id,
                                  int64_t num_blocks);
[[noreturn]] void raise_shared_block(const char* op, int64_t b, int64_t h, int64_t i, int64_t id);

}  // namespace longattn
