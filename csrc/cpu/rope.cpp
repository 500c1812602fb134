// CPU RoPE: rotate q (and k) by positions * inv_freq, out of place or in place.
//
// Work items are (token, block of heads) so a decode step with one token still spreads its
// heads over the threads, while a long prefill keeps whole tokens per item. Each item builds
// the token's cos/sin table once (rope_math.h, vectorized over frequencies) and streams its
// heads through it (cpu/rope_rows.h): every element of q and k is read once and written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/rope_rows.h"
#include "rope_args.h"

namespace longattn::cpu {
namespace {

template <typename T>
void rope_kernel(const RopeParams& p) {
  using C = rope_rows::compute_t<T>;
  const int64_t tokens = p.tokens();
  const int64_t R = p.rotary_dim, half = R / 2;
  const int64_t heads_q = p.x[0].heads;
  const int64_t heads = heads_q + (p.n_tensors == 2 ? p.x[1].heads : 0);
  if (tokens == 0 || heads == 0) return;

  const std::vector<double> freq = rope_rows::frequencies(p);
  const C cos_mul = static_cast<C>(p.scaling);
  const C sin_mul = static_cast<C>(p.inverse ? -p.scaling : p.scaling);

  // Split a token's heads only when there are too few tokens to occupy the threads.
  const int64_t threads = at::get_num_threads();
  const int64_t blocks_per_token =
      std::clamp<int64_t>((4 * threads + tokens - 1) / tokens, 1, heads);
  const int64_t heads_per_block = (heads + blocks_per_token - 1) / blocks_per_token;
  const int64_t items = tokens * blocks_per_token;
  const int64_t row_elems = std::max<int64_t>(p.x[0].head_dim, 1);
  // ~128 KB of fp32 per task: below that, waking a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / (heads_per_block * row_elems));

  parallel_for(items, grain, [&](int64_t begin, int64_t end) {
    // Per-thread: the token's tables (cos, sin per pair; per element for the interleaved
    // vector path) and the scratch rows of the plain-loop path.
    std::vector<C> buf(2 * half + 2 * R + 2 * R);
    rope_rows::Tables<C> tab{buf.data(), buf.data() + half, buf.data() + R, buf.data() + 2 * R};
    C* scratch = buf.data() + 3 * R;
    int64_t table_token = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / blocks_per_token;
      const int64_t h_begin = (item % blocks_per_token) * heads_per_block;
      const int64_t h_end = std::min(heads, h_begin + heads_per_block);
      const int64_t b = t / p.seqlen, l = t % p.seqlen;
      if (t != table_token) {
        rope_rows::position_tables<C>(p.position(b, l), freq.data(), half, cos_mul, sin_mul,
                                      p.interleaved, tab);
        table_token = t;
      }
      for (int64_t hg = h_begin; hg < h_end; ++hg) {
        const bool is_k = hg >= heads_q;
        const RopeTensor& v = p.x[is_k ? 1 : 0];
        const int64_t h = is_k ? hg - heads_q : hg;
        const T* in = static_cast<const T*>(v.in) + b * v.in_stride_b + l * v.in_stride_l +
                      h * v.in_stride_h;
        T* out = static_cast<T*>(v.out) + b * v.out_stride_b + l * v.out_stride_l +
                 h * v.out_stride_h;
        rope_rows::rotate_row<T, C>(in, out, tab, R, p.interleaved, scratch);
        if (p.copy_tail && v.head_dim > R) {
          std::memcpy(out + R, in + R, (v.head_dim - R) * sizeof(T));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k,
                                            const at::Tensor& positions, const at::Tensor& inv_freq,
                                            double attention_scaling, int64_t rotary_dim,
                                            bool interleaved, bool inverse) {
  RopeParams p = make_rope_params(q, k, positions, inv_freq, attention_scaling, rotary_dim,
                                  interleaved, inverse);
  auto outs = allocate_rope_outputs(p, q, k);
  LONGATTN_ROPE_DISPATCH(q.scalar_type(), "longattn::rope", [&] { rope_kernel<scalar_t>(p); });
  return outs;
}

void rope_inplace_cpu(const at::Tensor& q, const std::optional<at::Tensor>& k,
                      const at::Tensor& positions, const at::Tensor& inv_freq,
                      double attention_scaling, int64_t rotary_dim, bool interleaved, bool inverse) {
  RopeParams p = make_rope_params(q, k, positions, inv_freq, attention_scaling, rotary_dim,
                                  interleaved, inverse);
  set_rope_inplace(p, q, k);
  LONGATTN_ROPE_DISPATCH(q.scalar_type(), "longattn::rope_", [&] { rope_kernel<scalar_t>(p); });
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_", &rope_inplace_cpu);
}

}  // namespace longattn::cpu
