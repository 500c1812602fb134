// CPU decode attention over a per-head-length KV cache, contiguous (decode_attention) or paged
// (decode_attention_paged; common/kv_slots.h): flash-decoding with an optional fused score
// accumulation.
//
// Work items are (batch, kv head, key chunk of kDecodeChunk). An item loads each key/value row
// once and uses it for all G*n query rows of the GQA group (G query heads x n new tokens),
// writing a partial (out, lse) for its chunk. Partials are merged per row in chunk order, so the
// result does not depend on the thread count. With a score buffer the items keep their logits,
// and a second pass over the same items adds exp(s - lse) summed over the group's rows into
// scores[b, h, j]: each item owns its keys, so the sum is deterministic.
// Argument checks shared with CUDA: kvcache_args.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include <ATen/cpu/vec/functional.h>

#include "common/kv_slots.h"
#include "common/kvcache_math.h"
#include "common/merge.h"
#include "cpu/parallel.h"
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

// The cache's per-slot tensors (k, v, positions, scores) are reached through slots
// (common/kv_slots.h): contiguous buffers and paged pools alike.
struct DecodeArgs {
  int64_t B, Hq, Hkv, G, n, D, Dv, C;
  double scale;
  int64_t window, sinks;
  const void* q;  // contiguous (B, Hq, n, D)
  const void* k;
  const void* v;
  kv::SlotMap slots;
  kv::SlotStrides ks, vs;
  at::Tensor lengths;
  const int64_t* pos = nullptr;  // per slot, strides ps
  kv::SlotStrides ps;
  const int64_t* qpos = nullptr;  // (B, n) strides qps
  int64_t qps[2] = {0, 0};
  float* scores = nullptr;  // per slot, strides ss
  kv::SlotStrides ss;
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

// A paged cache's next block is elsewhere in memory, where the hardware prefetchers (which
// follow a stream) do not look: the rows kPrefetchAhead keys ahead are requested by hand, every
// cache line (measured on a 2-core Zen 4, fp32, blocks of 16 in a shuffled pool: 0.53x the
// contiguous cache's speed without, 0.78x with; one line in two, or only each block's first
// rows, gain little). gcc dropped __builtin_prefetch here, hence the instruction itself.
constexpr int64_t kPrefetchAhead = 16;

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t o = 0; o < bytes; o += 64) {
#if defined(__x86_64__)
    asm volatile("prefetcht0 %0" ::"m"(p[o]));
#else
    __builtin_prefetch(p + o);
#endif
  }
}

template <typename T>
struct DecodeScratch {
  using C = acc_t<T>;
  std::vector<C> qf, kf, vf, s, acc, m, l;
  std::vector<uint8_t> vis;  // per (row, key) of the chunk: visible by the mask
  std::vector<kv::Slot> slot;  // where each key of the chunk lives
  DecodeScratch(int64_t R, int64_t D, int64_t Dv)
      : qf(R * D), kf(D), vf(Dv), s(R * kv::kDecodeChunk), acc(R * Dv), m(R), l(R),
        vis(R * kv::kDecodeChunk), slot(kv::kDecodeChunk) {}
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
  const T* kbase = static_cast<const T*>(a.k);
  const bool paged = a.slots.paged();
  for (int64_t j = j0; j < j1; ++j) {
    const kv::Slot slot = w.slot[j - j0];
    if (paged && j + kPrefetchAhead < j1) {
      prefetch_row(kbase + a.ks.offset(w.slot[j + kPrefetchAhead - j0], h), D * sizeof(T));
    }
    const C* kr = as_compute<T, C>(kbase + a.ks.offset(slot, h), w.kf.data(), D);
    const int64_t kpos = a.pos ? a.pos[a.ps.offset(slot, h)] : j;
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
        a.slots.locate_range(b, h, j0, j1, w.slot.data());
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
        const T* vbase = static_cast<const T*>(a.v);
        for (int64_t j = j0; j < j1; ++j) {
          if (a.slots.paged() && j + kPrefetchAhead < j1) {
            prefetch_row(vbase + a.vs.offset(w.slot[j + kPrefetchAhead - j0], h),
                         a.Dv * sizeof(T));
          }
          const C* vr = as_compute<T, C>(vbase + a.vs.offset(w.slot[j - j0], h), w.vf.data(),
                                         a.Dv);
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
        std::vector<kv::Slot> slot(nj);
        a.slots.locate_range(b, h, j0, j1, slot.data());
        for (int64_t j = 0; j < nj; ++j) a.scores[a.ss.offset(slot[j], h)] += static_cast<float>(total[j]);
      });
}

// The decode once a holds the cache (k, v, slots, positions, scores and their strides).
std::tuple<at::Tensor, at::Tensor> run_decode(DecodeArgs& a, const DecodeShape& sh,
                                              const at::Tensor& q, const at::Tensor& lengths,
                                              const std::optional<at::Tensor>& q_positions,
                                              double scale, int64_t window, int64_t sinks) {
  constexpr const char* op = "longattn.decode_attention";
  const int64_t B = sh.B, Hq = sh.Hq, Hkv = sh.Hkv, n = sh.n, D = sh.D, C = sh.C;
  at::Tensor len_c = lengths.contiguous();
  for (int64_t x = 0; x < B * Hkv; ++x) {
    const int64_t L = read_int(len_c, x);
    TORCH_CHECK(L >= 0 && L <= C, op, ": lengths must lie in [0, capacity=", C, "], got ", L);
  }
  at::Tensor qc = q.contiguous();
  a.B = B; a.Hq = Hq; a.Hkv = Hkv; a.G = Hq / Hkv; a.n = n; a.D = D; a.Dv = sh.Dv;
  a.C = C; a.scale = scale; a.window = window; a.sinks = sinks;
  a.q = qc.const_data_ptr();
  a.lengths = len_c;
  if (q_positions.has_value()) {
    const auto& p = *q_positions;
    a.qpos = p.const_data_ptr<int64_t>();
    a.qps[0] = p.stride(0); a.qps[1] = p.stride(1);
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

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& lengths, const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& q_positions, double scale, int64_t window, int64_t sinks,
    const std::optional<at::Tensor>& scores) {
  const DecodeShape sh = check_decode_args(q, k_cache, v_cache, lengths, positions, q_positions,
                                           scores);
  DecodeArgs a{};
  a.k = k_cache.const_data_ptr(); a.v = v_cache.const_data_ptr();
  a.ks = cache_slot_strides(k_cache); a.vs = cache_slot_strides(v_cache);
  if (positions.has_value()) {
    a.pos = positions->const_data_ptr<int64_t>();
    a.ps = cache_slot_strides(*positions);
  }
  if (scores.has_value()) {
    a.scores = scores->data_ptr<float>();
    a.ss = cache_slot_strides(*scores);
  }
  return run_decode(a, sh, q, lengths, q_positions, scale, window, sinks);
}

// Every block a cached slot needs must be one of the pool's: the kernel reads it unchecked.
void check_tables(const char* op, const at::Tensor& block_table, const at::Tensor& lengths,
                  const PagedShape& ps) {
  const at::Tensor len_c = lengths.contiguous();
  const kv::SlotMap map = paged_slot_map(block_table, ps);
  const int64_t B = block_table.size(0), H = block_table.size(1);
  for (int64_t x = 0; x < B * H; ++x) {
    const int64_t b = x / H, h = x % H, L = read_int(len_c, x);
    const int64_t blocks = std::min(ps.max_blocks, (std::max<int64_t>(L, 0) + ps.block_size - 1) /
                                                       ps.block_size);
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t id = map.block_id(b, h, i);
      if (id < 0 || id >= ps.num_blocks) raise_bad_block(op, b, h, i, id, ps.num_blocks);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> decode_attention_paged_cpu(
    const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
    const at::Tensor& block_table, const at::Tensor& lengths,
    const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& q_positions,
    double scale, int64_t window, int64_t sinks, const std::optional<at::Tensor>& scores) {
  PagedShape ps{};
  const DecodeShape sh = check_paged_decode_args(q, k_pool, v_pool, block_table, lengths,
                                                 positions, q_positions, scores, &ps);
  DecodeArgs a{};
  a.k = k_pool.const_data_ptr(); a.v = v_pool.const_data_ptr();
  a.ks = pool_slot_strides(k_pool); a.vs = pool_slot_strides(v_pool);
  a.slots = paged_slot_map(block_table, ps);
  if (positions.has_value()) {
    a.pos = positions->const_data_ptr<int64_t>();
    a.ps = pool_slot_strides(*positions);
  }
  if (scores.has_value()) {
    a.scores = scores->data_ptr<float>();
    a.ss = pool_slot_strides(*scores);
  }
  // Lengths first (run_decode's message), then the blocks they reach.
  const at::Tensor len_c = lengths.contiguous();
  for (int64_t x = 0; x < sh.B * sh.Hkv; ++x) {
    const int64_t L = read_int(len_c, x);
    TORCH_CHECK(L >= 0 && L <= sh.C, "longattn.decode_attention_paged: lengths must lie in "
                "[0, capacity=", sh.C, "], got ", L);
  }
  check_tables("longattn.decode_attention_paged", block_table, lengths, ps);
  return run_decode(a, sh, q, lengths, q_positions, scale, window, sinks);
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("decode_attention_paged", &decode_attention_paged_cpu);
}

}  // namespace longattn::cpu
