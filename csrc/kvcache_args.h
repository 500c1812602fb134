// Argument checks of the KV-cache ops shared by every backend: shapes, dtypes and devices of
// decode_attention, compact_ and compact_rerotate_, with errors naming the argument. What
// depends on the values (lengths in range, keep lists sorted) each backend checks where the
// values live: the CPU on the host, CUDA in a validation kernel whose findings are reported
// by the messages below.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

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

// The first bad (b, h) of a compaction, as either backend found it: raise the error.
[[noreturn]] void raise_bad_length(const char* op, int64_t capacity, int64_t length);
[[noreturn]] void raise_bad_keep_length(const char* op, int64_t b, int64_t h, int64_t n,
                                        int64_t K);
// entry j of keep[b, h] is `value` (and follows `prev` when j > 0).
[[noreturn]] void raise_bad_keep(const char* op, int64_t b, int64_t h, int64_t length, int64_t j,
                                 int64_t value, int64_t prev);

}  // namespace longattn
