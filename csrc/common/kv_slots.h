// Where slot j of (batch b, kv head h) of a KV cache lives, for both cache layouts, so the CPU
// and CUDA kernels read contiguous and paged caches through one definition:
//
// - contiguous buffers (B, H, C, D): slot j of (b, h) is row (b, h, j);
// - paged pools (num_blocks, block_size, Hp, D) behind a block table (B, H, max_blocks) int32:
//   slot j lives in block table[b, h, j / block_size] at row j % block_size, head h of the
//   block when the pool holds every head of a sequence (Hp = H, FlashAttention's and vLLM's
//   layout), else head 0 (Hp = 1: every (b, h) owns its blocks, so heads can be compacted and
//   freed on their own).
//
// Every per-slot tensor (k, v, positions, scores) is then addressed as
// x * strides.x + y * strides.y + h * strides.h with (x, y) from SlotMap::locate: (b, j) for
// a contiguous cache, (block, j % block_size) for a paged one. No torch includes.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace longattn::kv {

// (x, y) of a slot; x < 0 when the block table names no block of the pool (bad input: the CPU
// reports it, the CUDA kernels turn the head's rows to NaN instead of reading out of bounds).
struct Slot {
  int64_t x, y;
  LONGATTN_HD bool valid() const { return x >= 0; }
};

// Element strides of one per-slot tensor: along x (batch or block), y (slot or row in the
// block) and the kv head (0 for a paged pool of per-head blocks).
struct SlotStrides {
  int64_t x = 0, y = 0, h = 0;
  LONGATTN_HD int64_t offset(Slot s, int64_t head) const { return s.x * x + s.y * y + head * h; }
};

struct SlotMap {
  const int32_t* table = nullptr;  // null: contiguous
  int64_t tb = 0, th = 0, tj = 0;  // element strides of the table (b, h, block index)
  int64_t block_size = 1;
  int64_t num_blocks = 0;

  LONGATTN_HD bool paged() const { return table != nullptr; }

  LONGATTN_HD int64_t block_id(int64_t b, int64_t h, int64_t blk) const {
    return table[b * tb + h * th + blk * tj];
  }

  LONGATTN_HD Slot locate(int64_t b, int64_t h, int64_t j) const {
    if (table == nullptr) return {b, j};
    const int64_t id = block_id(b, h, j / block_size);
    return {id >= 0 && id < num_blocks ? id : -1, j % block_size};
  }

  // locate for slots [j0, j1) into out[0 .. j1 - j0), one table read and one division per
  // block rather than per slot (a key's worth of work is small next to them on the CPU).
  LONGATTN_HD void locate_range(int64_t b, int64_t h, int64_t j0, int64_t j1, Slot* out) const {
    if (table == nullptr) {
      for (int64_t j = j0; j < j1; ++j) out[j - j0] = {b, j};
      return;
    }
    for (int64_t j = j0; j < j1;) {
      const Slot first = locate(b, h, j);
      const int64_t end = j + (block_size - first.y) < j1 ? j + (block_size - first.y) : j1;
      for (int64_t y = first.y; j < end; ++j, ++y) out[j - j0] = {first.x, y};
    }
  }
};

}  // namespace longattn::kv
