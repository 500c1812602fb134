#include "cpu/rotation_tables.h"

#include <algorithm>

#include "cpu/parallel.h"

namespace longattn::cpu {
namespace {

// Rotation of every q row (or k row) on one side, in table row order.
std::vector<RotSpec> row_specs(const RopeAttentionParams& p, bool queries, Side side) {
  const AttentionParams& a = p.attn;
  std::vector<RotSpec> specs;
  const int64_t seqs = a.varlen() ? a.batch : std::min<int64_t>(a.batch, 1);
  if (!a.varlen() && a.batch == 0) return specs;
  for (int64_t b = 0; b < seqs; ++b) {
    const SeqInfo si = seq_info(a, b);
    const int64_t n = queries ? si.q_len : si.k_len;
    for (int64_t r = 0; r < n; ++r) {
      specs.push_back(queries ? p.remap.q_rot(side, si.mask.q_start + r)
                              : p.remap.k_rot(side, si.mask.k_start + r));
    }
  }
  return specs;
}

bool same(const RotSpec& x, const RotSpec& y) { return x.a == y.a && x.b == y.b; }

template <bool Big, typename C>
void fill_row(const RotSpec& r, const double* f, const double* fs, int64_t half, C mul, C* cos,
              C* sin) {
  for (int64_t i = 0; i < half; ++i) {
    double quadrant;
    const double ang = rot_reduced_angle<Big>(r, f[i], fs[i], &quadrant);
    C s, c;
    rope::sincos_quadrant<C>(ang, quadrant, &s, &c);
    cos[i] = c * mul;
    sin[i] = s * mul;
  }
}

template <typename C>
RotTable<C> make_table(const std::vector<RotSpec>& specs, const RotaryParams& rot,
                       std::vector<std::vector<C>>& storage) {
  const int64_t half = rot.rotary_dim / 2, n = static_cast<int64_t>(specs.size());
  const bool constant =
      n > 0 && std::all_of(specs.begin(), specs.end(), [&](const RotSpec& s) { return same(s, specs[0]); });
  const int64_t rows = constant ? 1 : n;
  storage.emplace_back(static_cast<size_t>(rows * 2 * half));
  C* data = storage.back().data();
  std::vector<double> f(half), fs(half);
  for (int64_t i = 0; i < half; ++i) {
    f[i] = rot.frequency(i);
    fs[i] = rot.slow_frequency(i);
  }
  const C mul = static_cast<C>(rot.scaling);
  // ~64 rows per task: one row is a few hundred nanoseconds of angle reduction.
  parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      C* cos = data + r * 2 * half;
      C* sin = cos + half;
      // SelfExtend's grouped positions repeat G times: copy instead of reducing again.
      if (r > begin && same(specs[r], specs[r - 1])) {
        std::copy(cos - 2 * half, cos, cos);
        continue;
      }
      if (is_big_rotation(specs[r])) {
        fill_row<true, C>(specs[r], f.data(), fs.data(), half, mul, cos, sin);
      } else {
        fill_row<false, C>(specs[r], f.data(), fs.data(), half, mul, cos, sin);
      }
    }
  });
  return RotTable<C>{data, constant ? 0 : 2 * half, half};
}

// The near query rows as a view of the near key table when every query position is a key
// position at a fixed offset (self-attention, the default bottom-right alignment).
template <typename C>
bool share_keys(const std::vector<RotSpec>& q, const std::vector<RotSpec>& k,
                const RotTable<C>& kt, RotTable<C>* out) {
  if (q.empty() || k.empty() || kt.row_stride == 0) return false;
  const int64_t off = q[0].a - k[0].a;
  const int64_t nq = static_cast<int64_t>(q.size()), nk = static_cast<int64_t>(k.size());
  if (off < 0 || off + nq > nk) return false;
  for (int64_t i = 0; i < nq; ++i) {
    if (!same(q[i], k[i + off])) return false;
  }
  *out = RotTable<C>{kt.data + off * kt.row_stride, kt.row_stride, kt.half};
  return true;
}

}  // namespace

template <typename C>
RotationTables<C> build_rotation_tables(const RopeAttentionParams& p) {
  RotationTables<C> t;
  t.varlen = p.attn.varlen();
  const int sides = p.remap.has_far() ? 2 : 1;
  for (int s = 0; s < sides; ++s) {
    const Side side = s == 0 ? Side::kNear : Side::kFar;
    const std::vector<RotSpec> ks = row_specs(p, false, side), qs = row_specs(p, true, side);
    t.k[s] = make_table<C>(ks, p.rot, t.storage);
    if (!share_keys<C>(qs, ks, t.k[s], &t.q[s])) t.q[s] = make_table<C>(qs, p.rot, t.storage);
  }
  return t;
}

template RotationTables<float> build_rotation_tables<float>(const RopeAttentionParams&);
template RotationTables<double> build_rotation_tables<double>(const RopeAttentionParams&);

}  // namespace longattn::cpu
