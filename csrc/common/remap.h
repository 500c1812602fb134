// The position remaps of RoPE attention with RoPE applied inside the kernel (SelfExtend, ReRoPE,
// leaky ReRoPE, LM-Infinite, or none), one definition for the CPU and CUDA kernels: which
// (query, key) pairs are near, far or invisible, how a tile of pairs classifies, and the angle
// each side rotates q and k by. docs/semantics.md ("Training-free extension") states them for
// users; python/longattn/rope_reference.py holds the dense per-pair formulas they must equal.
//
// Query row i sits at p = q_start + i, key j at s = j. Every method splits the visible pairs by
// the distance d = p - s:
//   near:  0 <= d < W (every visible pair without a remap): q rotated at p, k at s;
//   far:   d >= W (LM-Infinite: and s < global_tokens): q and k rotated at the method's
//          positions, so that their relative angle is the remapped distance.
// Far keys precede near ones on every row, so in a tile row the far columns are a prefix. Both
// sets are MaskParams windows (near (W - 1, 0), far (None, -W), causal), and so is their union
// (the causal mask; LM-Infinite's lambda mask): kernels walk and skip tiles with the union, as
// plain attention does, and compute a second score set only for the tiles that hold both sides.
#pragma once
#include <cstdint>

#include "common/mask.h"
#include "common/rope_math.h"

namespace longattn {

enum class RemapKind : int { kNone = 0, kSelfExtend = 1, kReRoPE = 2, kLMInfinite = 3 };

enum class Side : int { kInvisible = 0, kNear = 1, kFar = 2 };

// A rotation by the angle a * theta + b * theta / leak of each frequency theta. Integers, so
// the angle is reduced exactly as RoPE's (common/rope_math.h): b only for leaky ReRoPE's
// slowed distances.
struct RotSpec {
  int64_t a = 0;
  int64_t b = 0;
};

LONGATTN_HD int64_t floor_div(int64_t x, int64_t y) {
  const int64_t q = x / y;
  return (x % y != 0 && ((x < 0) != (y < 0))) ? q - 1 : q;
}

// What a tile of pairs holds: the union's kind (empty, partial: some pair invisible, full), and
// whether some pair may be near / far. Sufficient, like MaskParams::classify: a tile is never
// reported without a side it has.
struct TileSides {
  TileKind kind = TileKind::kEmpty;
  bool near = false, far = false;
  LONGATTN_HD bool both() const { return near && far; }
};

// The remap of one sequence (its q_start fixed).
struct RemapMask {
  MaskParams near, far, all;  // all: the union, which the kernels walk
  bool has_far = false;
  int64_t far_key_end = kUnbounded;  // far keys are at positions below this

  LONGATTN_HD Side side(int64_t p, int64_t s) const {
    if (near.visible(p, s)) return Side::kNear;
    if (has_far && s < far_key_end && far.visible(p, s)) return Side::kFar;
    return Side::kInvisible;
  }

  // The first near key position of row p: columns before it are far (or invisible).
  LONGATTN_HD int64_t near_begin(int64_t p) const {
    return near.left >= kUnbounded ? -kUnbounded : p - near.left;
  }

  LONGATTN_HD TileSides classify(int64_t p0, int64_t p1, int64_t s0, int64_t s1) const {
    TileSides t;
    t.kind = all.classify(p0, p1, s0, s1);
    if (t.kind == TileKind::kEmpty) return t;
    t.near = near.classify(p0, p1, s0, s1) != TileKind::kEmpty;
    t.far = has_far && s0 < far_key_end && far.classify(p0, p1, s0, s1) != TileKind::kEmpty;
    return t;
  }
};

struct RemapParams {
  RemapKind kind = RemapKind::kNone;
  bool causal = true;                 // the remaps are causal; kNone may not be
  int64_t window = kUnbounded;        // W
  int64_t group = 1;                  // SelfExtend's G
  int64_t global_tokens = 0;          // LM-Infinite's far keys: s < global_tokens
  int64_t max_distance = 0;           // LM-Infinite's M
  double leak = 0.0;                  // leaky ReRoPE's k; 0: not leaky

  LONGATTN_HD bool has_far() const { return kind != RemapKind::kNone; }

  // The union of the visible pairs as attention's mask (q_start set per sequence): causal for
  // SelfExtend and ReRoPE, the lambda mask for LM-Infinite.
  LONGATTN_HD MaskParams union_mask() const {
    MaskParams m;
    m.causal = causal;
    if (kind == RemapKind::kLMInfinite) {
      m.left = window - 1;
      m.right = 0;
      m.sinks = global_tokens;
    }
    return m;
  }

  LONGATTN_HD RemapMask mask(const MaskParams& all) const {
    RemapMask r;
    r.all = all;
    r.near = all;
    r.near.sinks = 0;
    r.has_far = has_far();
    if (r.has_far) {
      r.near.left = window - 1;
      r.near.right = 0;
      r.far = r.near;
      r.far.left = kUnbounded;
      r.far.right = -window;
      if (kind == RemapKind::kLMInfinite) r.far_key_end = global_tokens;
    }
    return r;
  }

  // The rotation of query position p and of key position s on each side.
  LONGATTN_HD RotSpec q_rot(Side side, int64_t p) const {
    if (side != Side::kFar) return {p, 0};
    switch (kind) {
      case RemapKind::kSelfExtend: return {floor_div(p, group) + window - window / group, 0};
      case RemapKind::kReRoPE: return leak > 0.0 ? RotSpec{window, p - window} : RotSpec{window, 0};
      case RemapKind::kLMInfinite: return {max_distance, 0};
      default: return {p, 0};
    }
  }
  LONGATTN_HD RotSpec k_rot(Side side, int64_t s) const {
    if (side != Side::kFar) return {s, 0};
    switch (kind) {
      case RemapKind::kSelfExtend: return {floor_div(s, group), 0};
      case RemapKind::kReRoPE: return leak > 0.0 ? RotSpec{0, s} : RotSpec{0, 0};
      default: return {0, 0};  // LM-Infinite: k unrotated (only the attention scaling)
    }
  }
};

// The rotary part of the call: pairs (i, i + rotary_dim / 2) (NeoX) or (2i, 2i + 1)
// (interleaved), cos and sin times `scaling`; features past rotary_dim are neither rotated
// nor scaled.
struct RotaryParams {
  const void* inv_freq = nullptr;  // rotary_dim / 2 values, fp32 (or fp64)
  bool inv_freq_fp64 = false;
  int64_t rotary_dim = 0;
  bool interleaved = false;
  double scaling = 1.0;
  double leak = 0.0;  // the remap's, for the slowed frequency

  LONGATTN_HD double frequency(int64_t i) const {
    return inv_freq_fp64 ? static_cast<const double*>(inv_freq)[i]
                         : static_cast<double>(static_cast<const float*>(inv_freq)[i]);
  }
  // theta / leak in float64 (leaky ReRoPE's slowed frequency), 0 when not leaky.
  LONGATTN_HD double slow_frequency(int64_t i) const { return leak > 0.0 ? frequency(i) / leak : 0.0; }
  // Feature indices of pair i.
  LONGATTN_HD int64_t pair_a(int64_t i) const { return interleaved ? 2 * i : i; }
  LONGATTN_HD int64_t pair_b(int64_t i) const { return interleaved ? 2 * i + 1 : i + rotary_dim / 2; }
};

LONGATTN_HD bool is_big_rotation(const RotSpec& r) {
  return rope::is_big_position(r.a) || rope::is_big_position(r.b);
}

// The angle of RotSpec r for frequency f (slowed frequency f_slow) reduced mod pi/2: the two
// products reduced each (exactly for the integer times the fp32 frequency, as rope_math.h),
// then their sum once more, as reduced_angle<true> combines its two parts. Big as in
// reduced_angle; one branch per row (b == 0), none per frequency.
template <bool Big>
LONGATTN_HD double rot_reduced_angle(const RotSpec& r, double f, double f_slow, double* quadrant) {
  double qa;
  const double ra = rope::reduced_angle<Big>(r.a, f, &qa);
  if (r.b == 0) {
    *quadrant = qa;
    return ra;
  }
  double qb, qs;
  const double rb = rope::reduced_angle<Big>(r.b, f_slow, &qb);
  const double rs = rope::reduce_pio2(ra + rb, &qs);
  *quadrant = rope::mod4(qa + qb + qs);
  return rs;
}

// cos and sin of rotation r for pair i, times rot.scaling, in T.
template <typename T>
LONGATTN_HD void rot_sincos(const RotSpec& r, const RotaryParams& rot, int64_t i, T* s, T* c) {
  double quadrant;
  const double f = rot.frequency(i), fs = rot.slow_frequency(i);
  const double ang = is_big_rotation(r) ? rot_reduced_angle<true>(r, f, fs, &quadrant)
                                        : rot_reduced_angle<false>(r, f, fs, &quadrant);
  rope::sincos_quadrant<T>(ang, quadrant, s, c);
  *s *= static_cast<T>(rot.scaling);
  *c *= static_cast<T>(rot.scaling);
}

}  // namespace longattn
