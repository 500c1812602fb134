// CPU in-place compaction of a KV cache: compact_ / compact_rerotate_ on contiguous buffers and
// compact_paged_ on a paged pool (common/kv_slots.h), optionally re-rotating the kept keys to new
// positions on the way.
//
// Every keep list (and, paged, every block a cached slot needs) is validated before anything
// moves: a bad index leaves the cache untouched. Then (batch, head) items copy slot idx[j] down
// to slot j. Indices are strictly ascending, so idx[j] >= j and no row is read after it was
// overwritten. A paged head first remaps the new blocks whose rows already sit in one old block
// (common/kv_paged.h): those move nothing, and the table then names the kept blocks only.
// Argument checks shared with CUDA: kvcache_args.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/kv_paged.h"
#include "common/kv_slots.h"
#include "common/kvcache_math.h"
#include "cpu/parallel.h"
#include "cpu/rope_rows.h"
#include "kvcache_args.h"

namespace longattn::cpu {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

int64_t read_int(const at::Tensor& t, int64_t off) {
  return t.scalar_type() == at::kLong ? t.const_data_ptr<int64_t>()[off]
                                      : static_cast<int64_t>(t.const_data_ptr<int32_t>()[off]);
}

// compact_rerotate_: the kept key keep[j] is rotated by new_positions[j] - positions[keep[j]]
// (its first rotary_dim features) while it moves to slot j; positions[j] <- new_positions[j].
struct Rerotation {
  const int64_t* new_pos;
  int64_t ns[3];
  std::vector<double> freq;
  int64_t rotary_dim;
  bool interleaved;
};

// The per-slot tensors of the cache, either layout.
struct CacheRows {
  char* k = nullptr;
  char* v = nullptr;
  int64_t es = 0, krow = 0, vrow = 0;  // element size, row bytes
  kv::SlotStrides ks, vs;
  int64_t* pos = nullptr;
  kv::SlotStrides ps;
  float* sc = nullptr;
  kv::SlotStrides ss;
  kv::SlotMap slots;
  int32_t* table = nullptr;  // paged: the block table, rewritten per head after its moves
};

CacheRows cache_rows(const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& scores, bool paged) {
  auto strides = [&](const at::Tensor& t) {
    return paged ? pool_slot_strides(t) : cache_slot_strides(t);
  };
  CacheRows c;
  c.k = static_cast<char*>(k.data_ptr());
  c.v = static_cast<char*>(v.data_ptr());
  c.es = k.element_size();
  c.krow = k.size(3) * c.es;
  c.vrow = v.size(3) * c.es;
  c.ks = strides(k);
  c.vs = strides(v);
  if (positions.has_value()) {
    c.pos = positions->data_ptr<int64_t>();
    c.ps = strides(*positions);
  }
  if (scores.has_value()) {
    c.sc = scores->data_ptr<float>();
    c.ss = strides(*scores);
  }
  return c;
}

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

// Paged: the blocks the cached slots need are the pool's, and no block serves two of them (the
// moves are in place: a shared block would be written for one head under another's feet).
void validate_tables(const char* op, const CompactShape& sh, const PagedShape& ps,
                     const kv::SlotMap& map, const at::Tensor& lengths) {
  const at::Tensor len_c = lengths.contiguous();
  std::vector<uint8_t> used(ps.num_blocks, 0);
  for (int64_t x = 0; x < sh.B * sh.H; ++x) {
    const int64_t b = x / sh.H, h = x % sh.H;
    const int64_t blocks = (read_int(len_c, x) + ps.block_size - 1) / ps.block_size;
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t id = map.block_id(b, h, i);
      if (id < 0 || id >= ps.num_blocks) raise_bad_block(op, b, h, i, id, ps.num_blocks);
      if (used[id]) raise_shared_block(op, b, h, i, id);
      used[id] = 1;
    }
  }
}

// Per (b, h), slots in increasing j: idx[j] >= j and only slots below j were written, so every
// source row is read before it is overwritten. Rotation tables are rebuilt only when the shift
// changes (a StreamingLLM eviction shifts a whole run of keys by the same amount).
template <typename T>
void compact_kernel(const CompactShape& sh, const CacheRows& c, const int64_t* idx,
                    const std::vector<int64_t>& counts, const Rerotation* rot) {
  using C = acc_t<T>;
  const int64_t R = rot ? rot->rotary_dim : 0, half = R / 2, es = c.es;
  const int64_t bs = c.slots.block_size;
  parallel_items(
      sh.B * sh.H, [&] { return std::vector<C>(5 * R); },
      [&](int64_t x, std::vector<C>& buf) {
        const int64_t b = x / sh.H, h = x % sh.H, n = counts[x];
        const int64_t* ix = idx + x * sh.K;
        auto new_pos = [&](int64_t j) {
          return rot->new_pos[b * rot->ns[0] + h * rot->ns[1] + j * rot->ns[2]];
        };
        auto slot = [&](int64_t j) { return c.slots.locate(b, h, j); };
        // Paged: which new blocks keep their rows where they are (common/kv_paged.h).
        const int64_t nb_new = (n + bs - 1) / bs;
        std::vector<uint8_t> remapped;
        std::vector<int64_t> source;
        if (c.slots.paged()) {
          remapped.assign(nb_new, 0);
          source.assign(nb_new, -1);
          auto shifted = [&](int64_t j) {
            return rot != nullptr && new_pos(j) != c.pos[c.ps.offset(slot(ix[j]), h)];
          };
          for (int64_t jb = nb_new - 1; jb >= 0; --jb) {
            const int64_t ob = kv::remap_source(ix, n, bs, jb, shifted);
            source[jb] = ob;
            remapped[jb] = ob >= 0 && kv::remap_allowed(jb, ob, nb_new, ob < nb_new && remapped[ob]);
          }
        }
        rope_rows::Tables<C> tab{buf.data(), buf.data() + half, buf.data() + R, buf.data() + 2 * R};
        C* scratch = buf.data() + 3 * R;
        bool have_table = false;
        int64_t table_delta = 0;
        for (int64_t j = 0; j < n; ++j) {
          if (c.slots.paged() && remapped[j / bs]) continue;
          const int64_t s = ix[j];
          const kv::Slot from = slot(s), to = slot(j);
          char* ksrc = c.k + c.ks.offset(from, h) * es;
          char* kdst = c.k + c.ks.offset(to, h) * es;
          int64_t delta = 0;
          if (rot) {
            const int64_t np = new_pos(j);
            delta = np - c.pos[c.ps.offset(from, h)];  // read before slot j's is written (s >= j)
            c.pos[c.ps.offset(to, h)] = np;
          }
          if (s == j && delta == 0) continue;
          if (delta != 0) {
            if (!have_table || delta != table_delta) {
              rope_rows::position_tables<C>(delta, rot->freq.data(), half, C(1), C(1),
                                            rot->interleaved, tab);
              have_table = true;
              table_delta = delta;
            }
            rope_rows::rotate_row<T, C>(reinterpret_cast<const T*>(ksrc),
                                        reinterpret_cast<T*>(kdst), tab, R, rot->interleaved,
                                        scratch);
            if (s != j) std::memcpy(kdst + R * es, ksrc + R * es, c.krow - R * es);
          } else {
            std::memcpy(kdst, ksrc, c.krow);
          }
          if (s == j) continue;
          std::memcpy(c.v + c.vs.offset(to, h) * es, c.v + c.vs.offset(from, h) * es, c.vrow);
          if (c.pos && !rot) c.pos[c.ps.offset(to, h)] = c.pos[c.ps.offset(from, h)];
          if (c.sc) c.sc[c.ss.offset(to, h)] = c.sc[c.ss.offset(from, h)];
        }
        if (c.slots.paged()) {  // the new table, once every move has read the old one
          std::vector<int32_t> row(sh.C / bs, -1);
          for (int64_t jb = 0; jb < nb_new; ++jb) {
            row[jb] = static_cast<int32_t>(c.slots.block_id(b, h, remapped[jb] ? source[jb] : jb));
          }
          for (size_t i = 0; i < row.size(); ++i) {
            c.table[b * c.slots.tb + h * c.slots.th + static_cast<int64_t>(i) * c.slots.tj] = row[i];
          }
        }
      });
}

void compact_impl(const char* op, const at::Tensor& k, const CacheRows& rows,
                  const at::Tensor& lengths, const at::Tensor& keep,
                  const at::Tensor& keep_lengths, const CompactShape& sh, const Rerotation* rot,
                  const PagedShape* paged) {
  const at::Tensor keep_c = keep.to(at::kLong).contiguous();
  const at::Tensor kl_c = keep_lengths.contiguous();
  const std::vector<int64_t> counts = validate_keep_lists(op, sh, lengths, keep_c, kl_c);
  if (paged != nullptr) validate_tables(op, sh, *paged, rows.slots, lengths);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(),
                                  "longattn::compact_", [&] {
    compact_kernel<scalar_t>(sh, rows, keep_c.const_data_ptr<int64_t>(), counts, rot);
  });
  // New lengths, written in lengths' own dtype.
  lengths.copy_(kl_c.to(lengths.scalar_type()));
}

Rerotation make_rerotation(const at::Tensor& new_positions, const at::Tensor& inv_freq,
                           int64_t rotary_dim, bool interleaved) {
  Rerotation rot{new_positions.const_data_ptr<int64_t>(),
                 {new_positions.stride(0), new_positions.stride(1), new_positions.stride(2)},
                 std::vector<double>(rotary_dim / 2),
                 rotary_dim,
                 interleaved};
  const at::Tensor f = inv_freq.to(at::kDouble).contiguous();
  std::copy(f.const_data_ptr<double>(), f.const_data_ptr<double>() + rotary_dim / 2,
            rot.freq.begin());
  return rot;
}

void compact_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& scores,
                 const at::Tensor& lengths, const at::Tensor& keep, const at::Tensor& keep_lengths) {
  constexpr const char* op = "longattn.compact_";
  const CompactShape sh = check_compact_args(op, k_cache, v_cache, positions, scores, lengths,
                                             keep, keep_lengths);
  compact_impl(op, k_cache, cache_rows(k_cache, v_cache, positions, scores, false), lengths, keep,
               keep_lengths, sh, nullptr, nullptr);
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
  const Rerotation rot = make_rerotation(new_positions, inv_freq, rotary_dim, interleaved);
  compact_impl(op, k_cache, cache_rows(k_cache, v_cache, positions, scores, false), lengths, keep,
               keep_lengths, sh, &rot, nullptr);
}

void compact_paged_cpu(const at::Tensor& k_pool, const at::Tensor& v_pool,
                       const std::optional<at::Tensor>& positions,
                       const std::optional<at::Tensor>& scores, const at::Tensor& block_table,
                       const at::Tensor& lengths, const at::Tensor& keep,
                       const at::Tensor& keep_lengths,
                       const std::optional<at::Tensor>& new_positions,
                       const std::optional<at::Tensor>& inv_freq, int64_t rotary_dim,
                       bool interleaved) {
  constexpr const char* op = "longattn.compact_paged_";
  PagedShape ps{};
  const CompactShape sh =
      check_compact_paged_args(k_pool, v_pool, positions, scores, block_table, lengths, keep,
                               keep_lengths, new_positions, inv_freq, rotary_dim, &ps);
  CacheRows rows = cache_rows(k_pool, v_pool, positions, scores, true);
  rows.slots = paged_slot_map(block_table, ps);
  rows.table = block_table.data_ptr<int32_t>();
  if (inv_freq.has_value()) {
    const Rerotation rot = make_rerotation(*new_positions, *inv_freq, rotary_dim, interleaved);
    compact_impl(op, k_pool, rows, lengths, keep, keep_lengths, sh, &rot, &ps);
  } else {
    compact_impl(op, k_pool, rows, lengths, keep, keep_lengths, sh, nullptr, &ps);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("compact_", &compact_cpu);
  m.impl("compact_rerotate_", &compact_rerotate_cpu);
  m.impl("compact_paged_", &compact_paged_cpu);
}

}  // namespace longattn::cpu
