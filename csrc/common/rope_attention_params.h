// The parameters of one rope_attention call (RoPE applied inside attention, with a position
// remap), as both backends receive them: attention's (q, k, v before RoPE; mask = the remap's
// union of visible pairs, common/remap.h; no ALiBi, no log-n), the remap and the rotary part.
#pragma once
#include "common/attention_params.h"
#include "common/remap.h"

namespace longattn {

struct RopeAttentionParams {
  AttentionParams attn;
  RemapParams remap;
  RotaryParams rot;

  // The remap of sequence b (its q_start resolved).
  LONGATTN_HD RemapMask remap_mask(const SeqInfo& si) const { return remap.mask(si.mask); }
};

}  // namespace longattn
