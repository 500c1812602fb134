// The parameters of one RoPE call as both backends receive them: raw pointers and element
// strides, no torch types. Tokens are addressed as (b, l); the varlen layout (T, H, D) is
// batch 1 with seqlen T, so one indexing scheme serves both.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace longattn {

// One rotated tensor (q or k): input and output views. In place, out == in and the strides
// agree; out of place, out is contiguous and the tail past rotary_dim is copied.
struct RopeTensor {
  const void* in = nullptr;
  void* out = nullptr;
  int64_t heads = 0, head_dim = 0;
  int64_t in_stride_b = 0, in_stride_l = 0, in_stride_h = 0;  // elements; head dim stride 1
  int64_t out_stride_b = 0, out_stride_l = 0, out_stride_h = 0;
};

struct RopeParams {
  int64_t batch = 0, seqlen = 0;  // tokens = batch * seqlen
  RopeTensor x[2];                // q, then k when n_tensors == 2
  int n_tensors = 0;

  const void* positions = nullptr;  // int32 or int64, element (b, l) at b*stride_b + l*stride_l
  bool positions_int64 = true;
  int64_t pos_stride_b = 0, pos_stride_l = 0;  // stride_b 0: one row shared by the batch

  const void* inv_freq = nullptr;  // rotary_dim / 2 values, fp32 (or fp64)
  bool inv_freq_fp64 = false;
  int64_t rotary_dim = 0;

  double scaling = 1.0;   // multiplies cos and sin (HF attention_scaling)
  bool interleaved = false;  // GPT-J pairs (2i, 2i+1); else NeoX pairs (i, i + rotary_dim/2)
  bool inverse = false;      // rotate by -angle (the backward)
  bool copy_tail = true;     // out of place: write features past rotary_dim unchanged

  LONGATTN_HD int64_t tokens() const { return batch * seqlen; }
};

}  // namespace longattn
