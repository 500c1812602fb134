// The cos/sin tables of one rope_attention call on the CPU: for every query and key row, the
// rotation of each side it can be scored on (common/remap.h: near, and far under a remap),
// times the attention scaling, in the accumulation type. Built once per call, so each row's
// exact angle reduction (common/rope_math.h) runs once per side instead of once per tile that
// loads the row; a tile then rotates its q or k rows with a multiply-add per element.
//
// Rows are per position, not per head: the tables are at most 4 x (Lq + Lk) x rotary_dim
// values, against the 4 rotated (B, L, H, D) copies of q and k the two-pass method holds.
// A side whose rotation is the same for every row (ReRoPE's and LM-Infinite's far side) is one
// row; near query rows that sit at key positions (self-attention) share the key table.
#pragma once
#include <cstdint>
#include <vector>

#include "common/rope_attention_params.h"

namespace longattn::cpu {

template <typename C>
struct RotTable {
  const C* data = nullptr;
  int64_t row_stride = 0;  // 0: one row serves every row
  int64_t half = 0;
  const C* cos(int64_t row) const { return data + row * row_stride; }
  const C* sin(int64_t row) const { return data + row * row_stride + half; }
};

template <typename C>
struct RotationTables {
  RotTable<C> q[2], k[2];  // index: 0 near, 1 far
  bool varlen = false;
  std::vector<std::vector<C>> storage;

  // Table rows: dense, the row index (positions are shared by the batch); varlen, the token.
  int64_t q_row(const SeqInfo& si, int64_t i) const { return (varlen ? si.q_token0 : 0) + i; }
  int64_t k_row(const SeqInfo& si, int64_t j) const { return (varlen ? si.k_token0 : 0) + j; }
};

template <typename C>
RotationTables<C> build_rotation_tables(const RopeAttentionParams& p);

}  // namespace longattn::cpu
