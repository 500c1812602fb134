// CPU KV-cache ops: decode attention over a per-head-length cache (flash-decoding split with
// an optional fused score accumulation) and in-place compaction (optionally re-rotating the
// kept keys to new positions on the way).
//
// decode_attention: work items are (batch, kv head, key chunk of kDecodeChunk). An item loads
// each key/value row once and uses it for all G*n query rows of the GQA group (G query heads x
// n new tokens), writing a partial (out, lse) for its chunk. Partials are merged per row in
// chunk order, so the result does not depend on the thread count. With a score buffer the
// items keep their logits, and a second pass over the same items adds exp(s - lse) summed over
// the group's rows into scores[b, h, j]: each item owns its keys, so the sum is deterministic.
//
// compact_ / compact_rerotate_: every keep list is validated before anything moves (a bad
// index leaves the cache untouched); then (batch, head) items copy row idx[j] down to row j.
// Indices are strictly ascending, so idx[j] >= j and no row is read after it was overwritten.
// Argument checks shared with CUDA: kvcache_args.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include <ATen/cpu/vec/functional.h>

#include "common/kvcache_math.h"
#include "common/merge.h"
#include "cpu/parallel.h"
#include "cpu/rope_rows.h"
#include "cpu/vec_math.h"
#include "kvcache_args.h"

namespace longattn::cpu {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

int64_t read_int(const at::Tensor& t, int64_t off) {
  return t.scalar_type() == at::kLong ? t.const_data_ptr<int64_t>()[off]
                                      : static_cast<int64_t>(t.const_data_ptr<int32_t>()[off]);
}

// ---------------------------------------------------------------------------------------
// decode_attention
// ---------------------------------------------------------------------------------------

struct DecodeArgs {
  int64_t B, Hq, Hkv, G, n, D, Dv, C;
  double scale;
  int64_t window, sinks;
  const void* q;  // contiguous (B, Hq, n, D)
  const void* k;
  const void* v;
  int64_t ks[3], vs[3];  // strides of b, h, slot
  at::Tensor lengths;
  const int64_t* pos = nullptr;  // (B, Hkv, C) strides ps
  int64_t ps[3] = {0, 0, 0};
  const int64_t* qpos = nullptr;  // (B, n) strides qps
  int64_t qps[2] = {0, 0};
  float* scores = nullptr;  // (B, Hkv, C) strides ss
  int64_t ss[3] = {0, 0, 0};
};

template <typename C>
inline C dot(const C* __restrict a, const C* __restrict b, int64_t D) {
  C s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename T, typename C>
inline const C* as_compute(const T* src, C* buf, int64_t D) {
  if constexpr (std::is_same_v<T, C>) {
    return src;
  } else if constexpr (std::is_same_v<C, float>) {
    // bf16 / fp16: at::vec's widening conversion (c10's scalar casts do not vectorize).
    using rVec = at::vec::Vectorized<T>;
    int64_t d = 0;
    for (; d + rVec::size() <= D; d += rVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(rVec::loadu(src + d));
      lo.store(buf + d);
      hi.store(buf + d + rVec::size() / 2);
    }
    for (; d < D; ++d) buf[d] = static_cast<float>(src[d]);
    return buf;
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<C>(src[d]);
    return buf;
  }
}

template <typename T>
struct DecodeScratch {
  using C = acc_t<T>;
  std::vector<C> qf, kf, vf, s, acc, m, l;
  std::vector<uint8_t> vis;  // per (row, key) of the chunk: visible by the mask
  DecodeScratch(int64_t R, int64_t D, int64_t Dv)
      : qf(R * D), kf(D), vf(Dv), s(R * kv::kDecodeChunk), acc(R * Dv), m(R), l(R),
        vis(R * kv::kDecodeChunk) {}
};

// Logits of the item's rows against keys [j0, j1), masked to -inf. Returns per-row maxima.
template <typename T>
void item_logits(const DecodeArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1,
                 DecodeScratch<T>& w) {
  using C = acc_t<T>;
  const int64_t R = a.G * a.n, D = a.D;
  const T* q = static_cast<const T*>(a.q);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r / a.n, i = r % a.n;
    const T* src = q + (((b * a.Hq) + h * a.G + g) * a.n + i) * D;
    for (int64_t d = 0; d < D; ++d) w.qf[r * D + d] = static_cast<C>(src[d]);
  }
  const C scale = static_cast<C>(a.scale);
  const T* kb = static_cast<const T*>(a.k) + b * a.ks[0] + h * a.ks[1];
  for (int64_t j = j0; j < j1; ++j) {
    const C* kr = as_compute<T, C>(kb + j * a.ks[2], w.kf.data(), D);
    const int64_t kpos = a.pos ? a.pos[b * a.ps[0] + h * a.ps[1] + j * a.ps[2]] : j;
    for (int64_t r = 0; r < R; ++r) {
      const bool has_q = a.qpos != nullptr;
      const int64_t qp = has_q ? a.qpos[b * a.qps[0] + (r % a.n) * a.qps[1]] : 0;
      const bool vis = !has_q || kv::decode_visible(j, kpos, true, qp, a.window, a.sinks);
      w.vis[r * kv::kDecodeChunk + (j - j0)] = vis;
      w.s[r * kv::kDecodeChunk + (j - j0)] =
          vis ? dot<C>(w.qf.data() + r * D, kr, D) * scale : -std::numeric_limits<C>::infinity();
    }
  }
}

template <typename T>
void decode_kernel(const DecodeArgs& a, at::Tensor& out, at::Tensor& lse) {
  using C = acc_t<T>;
  const int64_t R = a.G * a.n, CH = kv::kDecodeChunk;
  int64_t max_len = 0;
  for (int64_t x = 0; x < a.B * a.Hkv; ++x) max_len = std::max(max_len, read_int(a.lengths, x));
  const int64_t nch = std::max<int64_t>(1, (max_len + CH - 1) / CH);
  const int64_t heads = a.B * a.Hkv, items = heads * nch;
  const C ninf = -std::numeric_limits<C>::infinity();
  std::vector<C> part_out(items * R * a.Dv), part_lse(items * R, ninf), full_lse(heads * R);
  std::vector<uint8_t> part_seen(items * R, 0);  // the chunk has a key the row sees
  // With a score buffer, phase 1 keeps its logits for phase 3 (B * Hq * n * max_len values).
  std::unique_ptr<C[]> logits(a.scores != nullptr ? new C[items * R * CH] : nullptr);
  auto length_of = [&](int64_t bh) { return read_int(a.lengths, bh); };

  // Phase 1: partial attention per chunk.
  parallel_items(
      items, [&] { return DecodeScratch<T>(R, a.D, a.Dv); },
      [&](int64_t it, DecodeScratch<T>& w) {
        const int64_t bh = it / nch, c = it % nch, b = bh / a.Hkv, h = bh % a.Hkv;
        const int64_t j0 = c * CH, j1 = std::min(length_of(bh), j0 + CH);
        C* po = part_out.data() + it * R * a.Dv;
        C* pl = part_lse.data() + it * R;
        std::fill(po, po + R * a.Dv, C(0));
        if (j0 >= j1) return;
        item_logits<T>(a, b, h, j0, j1, w);
        if (logits) std::copy(w.s.begin(), w.s.begin() + R * CH, logits.get() + it * R * CH);
        for (int64_t r = 0; r < R; ++r) {
          C* s = w.s.data() + r * CH;
          const C m = row_max<C>(s, j1 - j0);  // NaN if a logit is (docs/semantics.md)
          const C l = m != ninf ? exp_sum<C>(s, j1 - j0, C(1), m) : C(0);
          w.m[r] = m;
          w.l[r] = l;
          const uint8_t* vr = w.vis.data() + r * CH;
          part_seen[it * R + r] = std::any_of(vr, vr + (j1 - j0), [](uint8_t x) { return x != 0; });
        }
        std::fill(w.acc.begin(), w.acc.end(), C(0));
        const T* vb = static_cast<const T*>(a.v) + b * a.vs[0] + h * a.vs[1];
        for (int64_t j = j0; j < j1; ++j) {
          const C* vr = as_compute<T, C>(vb + j * a.vs[2], w.vf.data(), a.Dv);
          for (int64_t r = 0; r < R; ++r) {
            if (w.m[r] == ninf) continue;
            const C p = w.s[r * CH + (j - j0)];
            // Masked keys add nothing (not 0 * v: a non-finite value reaches only the rows
            // that see it); a visible one adds p * v even when p underflowed, as the dense sum.
            if (p == C(0) && !w.vis[r * CH + (j - j0)]) continue;
            C* accr = w.acc.data() + r * a.Dv;
#pragma omp simd
            for (int64_t d = 0; d < a.Dv; ++d) accr[d] += p * vr[d];
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          if (w.m[r] == ninf) continue;
          const C inv = C(1) / w.l[r];
          for (int64_t d = 0; d < a.Dv; ++d) po[r * a.Dv + d] = w.acc[r * a.Dv + d] * inv;
          pl[r] = w.m[r] + static_cast<C>(std::log(w.l[r]));
        }
      });

  // Phase 2: merge the chunks of every row in chunk order (common/merge.h), then finish the row
  // by the shared rules (common/softmax_row.h; decode has no sink logit).
  T* o = out.data_ptr<T>();
  parallel_for(heads * R, 64, [&](int64_t begin, int64_t end) {
    std::vector<C> acc(a.Dv), lses(nch), weights(nch);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t bh = x / R, r = x % R, b = bh / a.Hkv, h = bh % a.Hkv;
      const int64_t g = r / a.n, i = r % a.n;
      bool seen = false;
      for (int64_t c = 0; c < nch; ++c) {
        lses[c] = part_lse[(bh * nch + c) * R + r];
        seen = seen || part_seen[(bh * nch + c) * R + r];
      }
      const C merged = merge_weights<C>(lses.data(), static_cast<int>(nch), weights.data());
      std::fill(acc.begin(), acc.end(), C(0));
      for (int64_t c = 0; c < nch; ++c) {
        if (weights[c] == C(0)) continue;  // a chunk that saw nothing, or underflow
        const C* po = part_out.data() + ((bh * nch + c) * R + r) * a.Dv;
        for (int64_t d = 0; d < a.Dv; ++d) acc[d] += weights[c] * po[d];
      }
      const RowFinish<C> f = finish_softmax_row<C>(merged, C(1), false, C(0), seen);
      full_lse[x] = f.lse;
      const int64_t row = ((b * a.Hq) + h * a.G + g) * a.n + i;
      for (int64_t d = 0; d < a.Dv; ++d) {
        o[row * a.Dv + d] = static_cast<T>(f.out_scale == C(0) ? C(0) : acc[d] * f.out_scale);
      }
      if (lse.scalar_type() == at::kDouble) {
        lse.data_ptr<double>()[row] = static_cast<double>(f.lse);
      } else {
        lse.data_ptr<float>()[row] = static_cast<float>(f.lse);
      }
    }
  });

  // Phase 3: scores[b, h, j] += sum over the group's rows of the probabilities, from the
  // logits phase 1 kept.
  if (a.scores == nullptr) return;
  parallel_items(
      items, [] { return 0; },
      [&](int64_t it, int&) {
        const int64_t bh = it / nch, c = it % nch, b = bh / a.Hkv, h = bh % a.Hkv;
        const int64_t j0 = c * CH, j1 = std::min(length_of(bh), j0 + CH);
        if (j0 >= j1) return;
        const C* ls = logits.get() + it * R * CH;
        const int64_t nj = j1 - j0;
        std::vector<C> tmp(nj), total(nj, C(0));
        for (int64_t r = 0; r < R; ++r) {  // rows in order: a fixed summation order
          const C lr = full_lse[bh * R + r];
          if (lr == ninf) continue;
          std::copy(ls + r * CH, ls + r * CH + nj, tmp.begin());
          exp_sum<C>(tmp.data(), nj, C(1), lr);
          if (lr != lr) {  // a NaN row: NaN mass for the keys it sees, none for masked ones
            for (int64_t j = 0; j < nj; ++j) tmp[j] = ls[r * CH + j] == ninf ? C(0) : tmp[j];
          }
          for (int64_t j = 0; j < nj; ++j) total[j] += tmp[j];
        }
        float* sc = a.scores + b * a.ss[0] + h * a.ss[1];
        for (int64_t j = 0; j < nj; ++j) sc[(j0 + j) * a.ss[2]] += static_cast<float>(total[j]);
      });
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& lengths, const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& q_positions, double scale, int64_t window, int64_t sinks,
    const std::optional<at::Tensor>& scores) {
  constexpr const char* op = "longattn.decode_attention";
  const DecodeShape sh = check_decode_args(q, k_cache, v_cache, lengths, positions, q_positions,
                                           scores);
  const int64_t B = sh.B, Hq = sh.Hq, Hkv = sh.Hkv, n = sh.n, D = sh.D, C = sh.C;
  at::Tensor len_c = lengths.contiguous();
  for (int64_t x = 0; x < B * Hkv; ++x) {
    const int64_t L = read_int(len_c, x);
    TORCH_CHECK(L >= 0 && L <= C, op, ": lengths must lie in [0, capacity=", C, "], got ", L);
  }
  DecodeArgs a{};
  at::Tensor qc = q.contiguous();
  a.B = B; a.Hq = Hq; a.Hkv = Hkv; a.G = Hq / Hkv; a.n = n; a.D = D; a.Dv = v_cache.size(3);
  a.C = C; a.scale = scale; a.window = window; a.sinks = sinks;
  a.q = qc.const_data_ptr(); a.k = k_cache.const_data_ptr(); a.v = v_cache.const_data_ptr();
  for (int d = 0; d < 3; ++d) { a.ks[d] = k_cache.stride(d); a.vs[d] = v_cache.stride(d); }
  a.lengths = len_c;
  if (positions.has_value()) {
    const auto& p = *positions;
    a.pos = p.const_data_ptr<int64_t>();
    for (int d = 0; d < 3; ++d) a.ps[d] = p.stride(d);
  }
  if (q_positions.has_value()) {
    const auto& p = *q_positions;
    a.qpos = p.const_data_ptr<int64_t>();
    a.qps[0] = p.stride(0); a.qps[1] = p.stride(1);
  }
  if (scores.has_value()) {
    const auto& s = *scores;
    a.scores = s.data_ptr<float>();
    for (int d = 0; d < 3; ++d) a.ss[d] = s.stride(d);
  }
  at::Tensor out = at::empty({B, Hq, n, a.Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, n}, q.options().dtype(
      q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (B * Hq * n == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "longattn::decode_attention",
                                  [&] { decode_kernel<scalar_t>(a, out, lse); });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------
// compact_ and compact_rerotate_
// ---------------------------------------------------------------------------------------

// compact_rerotate_: the kept key keep[j] is rotated by new_positions[j] - positions[keep[j]]
// (its first rotary_dim features) while it moves to row j; positions[j] <- new_positions[j].
struct Rerotation {
  const int64_t* new_pos;
  int64_t ns[3];
  std::vector<double> freq;
  int64_t rotary_dim;
  bool interleaved;
};

// Validates every keep list before anything moves (a bad index leaves the cache untouched);
// returns the kept counts per (b, h).
std::vector<int64_t> validate_keep_lists(const char* op, const CompactShape& sh,
                                         const at::Tensor& lengths, const at::Tensor& keep_c,
                                         const at::Tensor& kl_c) {
  const at::Tensor len_c = lengths.contiguous();
  const int64_t* idx = keep_c.const_data_ptr<int64_t>();
  std::vector<int64_t> counts(sh.B * sh.H);
  for (int64_t x = 0; x < sh.B * sh.H; ++x) {
    const int64_t b = x / sh.H, h = x % sh.H;
    const int64_t L = read_int(len_c, x), n = read_int(kl_c, x);
    if (L < 0 || L > sh.C) raise_bad_length(op, sh.C, L);
    if (n < 0 || n > sh.K) raise_bad_keep_length(op, b, h, n, sh.K);
    const int64_t* ix = idx + x * sh.K;
    const int64_t bad = kv::first_bad_keep(ix, 1, n, L);
    if (bad >= 0) raise_bad_keep(op, b, h, L, bad, ix[bad], bad > 0 ? ix[bad - 1] : -1);
    counts[x] = n;
  }
  return counts;
}

// Per (b, h), rows in increasing j: idx[j] >= j and only rows below j were written, so every
// source row is read before it is overwritten. Rotation tables are rebuilt only when the shift
// changes (a StreamingLLM eviction shifts a whole run of keys by the same amount).
template <typename T>
void compact_kernel(const CompactShape& sh, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const std::optional<at::Tensor>& positions,
                    const std::optional<at::Tensor>& scores, const int64_t* idx,
                    const std::vector<int64_t>& counts, const Rerotation* rot) {
  using C = acc_t<T>;
  char* kp = static_cast<char*>(k_cache.data_ptr());
  char* vp = static_cast<char*>(v_cache.data_ptr());
  const int64_t es = k_cache.element_size(), D = k_cache.size(3);
  const int64_t krow = D * es, vrow = v_cache.size(3) * es;
  const int64_t kst = k_cache.stride(2) * es, vst = v_cache.stride(2) * es;
  int64_t* pp = positions.has_value() ? positions->data_ptr<int64_t>() : nullptr;
  float* sp = scores.has_value() ? scores->data_ptr<float>() : nullptr;
  const int64_t R = rot ? rot->rotary_dim : 0, half = R / 2;
  parallel_items(
      sh.B * sh.H, [&] { return std::vector<C>(5 * R); },
      [&](int64_t x, std::vector<C>& buf) {
        const int64_t b = x / sh.H, h = x % sh.H;
        const int64_t* ix = idx + x * sh.K;
        char* kb = kp + (b * k_cache.stride(0) + h * k_cache.stride(1)) * es;
        char* vb = vp + (b * v_cache.stride(0) + h * v_cache.stride(1)) * es;
        int64_t* pr = pp ? pp + b * positions->stride(0) + h * positions->stride(1) : nullptr;
        const int64_t pst = pp ? positions->stride(2) : 0;
        float* sr = sp ? sp + b * scores->stride(0) + h * scores->stride(1) : nullptr;
        const int64_t sst = sp ? scores->stride(2) : 0;
        rope_rows::Tables<C> tab{buf.data(), buf.data() + half, buf.data() + R, buf.data() + 2 * R};
        C* scratch = buf.data() + 3 * R;
        bool have_table = false;
        int64_t table_delta = 0;
        for (int64_t j = 0; j < counts[x]; ++j) {
          const int64_t s = ix[j];
          int64_t delta = 0;
          if (rot) {
            const int64_t np = rot->new_pos[b * rot->ns[0] + h * rot->ns[1] + j * rot->ns[2]];
            delta = np - pr[s * pst];  // read before row j's position is overwritten (s >= j)
            pr[j * pst] = np;
          }
          if (s == j && delta == 0) continue;
          if (delta != 0) {
            if (!have_table || delta != table_delta) {
              rope_rows::position_tables<C>(delta, rot->freq.data(), half, C(1), C(1),
                                            rot->interleaved, tab);
              have_table = true;
              table_delta = delta;
            }
            rope_rows::rotate_row<T, C>(reinterpret_cast<const T*>(kb + s * kst),
                                        reinterpret_cast<T*>(kb + j * kst), tab, R,
                                        rot->interleaved, scratch);
            if (s != j) std::memcpy(kb + j * kst + R * es, kb + s * kst + R * es, krow - R * es);
          } else {
            std::memcpy(kb + j * kst, kb + s * kst, krow);
          }
          if (s == j) continue;
          std::memcpy(vb + j * vst, vb + s * vst, vrow);
          if (pr && !rot) pr[j * pst] = pr[s * pst];
          if (sr) sr[j * sst] = sr[s * sst];
        }
      });
}

void compact_impl(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& positions,
                  const std::optional<at::Tensor>& scores, const at::Tensor& lengths,
                  const at::Tensor& keep, const at::Tensor& keep_lengths, const CompactShape& sh,
                  const Rerotation* rot) {
  const at::Tensor keep_c = keep.to(at::kLong).contiguous();
  const at::Tensor kl_c = keep_lengths.contiguous();
  const std::vector<int64_t> counts = validate_keep_lists(op, sh, lengths, keep_c, kl_c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(),
                                  "longattn::compact_", [&] {
    compact_kernel<scalar_t>(sh, k_cache, v_cache, positions, scores,
                             keep_c.const_data_ptr<int64_t>(), counts, rot);
  });
  // New lengths, written in lengths' own dtype.
  lengths.copy_(kl_c.to(lengths.scalar_type()));
}

void compact_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& scores,
                 const at::Tensor& lengths, const at::Tensor& keep, const at::Tensor& keep_lengths) {
  constexpr const char* op = "longattn.compact_";
  const CompactShape sh = check_compact_args(op, k_cache, v_cache, positions, scores, lengths,
                                             keep, keep_lengths);
  compact_impl(op, k_cache, v_cache, positions, scores, lengths, keep, keep_lengths, sh, nullptr);
}

void compact_rerotate_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& positions, const std::optional<at::Tensor>& scores,
                          const at::Tensor& lengths, const at::Tensor& keep,
                          const at::Tensor& keep_lengths, const at::Tensor& new_positions,
                          const at::Tensor& inv_freq, int64_t rotary_dim, bool interleaved) {
  constexpr const char* op = "longattn.compact_rerotate_";
  const CompactShape sh = check_compact_args(op, k_cache, v_cache, positions, scores, lengths,
                                             keep, keep_lengths);
  check_rerotate_args(sh, k_cache, new_positions, inv_freq, rotary_dim);
  Rerotation rot{new_positions.const_data_ptr<int64_t>(),
                 {new_positions.stride(0), new_positions.stride(1), new_positions.stride(2)},
                 std::vector<double>(rotary_dim / 2),
                 rotary_dim,
                 interleaved};
  const at::Tensor f = inv_freq.to(at::kDouble).contiguous();
  std::copy(f.const_data_ptr<double>(), f.const_data_ptr<double>() + rotary_dim / 2,
            rot.freq.begin());
  compact_impl(op, k_cache, v_cache, positions, scores, lengths, keep, keep_lengths, sh, &rot);
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("compact_", &compact_cpu);
  m.impl("compact_rerotate_", &compact_rerotate_cpu);
}

}  // namespace longattn::cpu
