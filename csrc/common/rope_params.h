// The parameters of one RoPE call as both backends receive them: raw pointers and element
// strides, no torch types. Tokens are addressed as (b, l); the varlen layout (T, H, D) is
// batch 1 with seqlen T, so one indexing scheme serves both.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace longattn {

// One rotated tensor (q or k): input and output views. In place, out == in and the strides
// agree; out of place, out is contiguous and the tail past rotary_dim is copied.
// In rope_backward, `in` is the incoming gradient, `out` the gradient of the forward's input
// (null when not wanted) and `saved` the forward's input, which the inv_freq gradient reads.
struct RopeTensor {
  const void* in = nullptr;
  void* out = nullptr;
  const void* saved = nullptr;
  int64_t heads = 0, head_dim = 0;
  int64_t in_stride_b = 0, in_stride_l = 0, in_stride_h = 0;  // elements; head dim stride 1
  int64_t out_stride_b = 0, out_stride_l = 0, out_stride_h = 0;
  int64_t saved_stride_b = 0, saved_stride_l = 0, saved_stride_h = 0;
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

  // rope_backward: d loss / d inv_freq (rotary_dim / 2 values of inv_freq's dtype) goes here.
  void* grad_inv_freq = nullptr;

  LONGATTN_HD int64_t tokens() const { return batch * seqlen; }

  LONGATTN_HD int64_t position(int64_t b, int64_t l) const {
    const int64_t off = b * pos_stride_b + l * pos_stride_l;
    return positions_int64 ? static_cast<const int64_t*>(positions)[off]
                           : static_cast<const int32_t*>(positions)[off];
  }

  LONGATTN_HD double frequency(int64_t i) const {
    return inv_freq_fp64 ? static_cast<const double*>(inv_freq)[i]
                         : static_cast<double>(static_cast<const float*>(inv_freq)[i]);
  }

  // rope_backward rotates the gradients by the opposite of the forward's angle (inverse is the
  // negation of the forward's), so the forward rotated by sign * theta with this sign.
  LONGATTN_HD double forward_angle_sign() const { return inverse ? 1.0 : -1.0; }
};

}  // namespace longattn
