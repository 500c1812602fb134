// CPU backward of rope when inv_freq needs a gradient: the incoming gradients of q and k are
// rotated back (as the rope op with the opposite angle does) and, in the same pass,
//   dinv_freq[i] = sign * sum over tokens t of position[t] * sum over heads of
//                  (x_a dx_b - x_b dx_a) of pair i       (cpu/rope_grad_rows.h)
// with x the forward's input and sign -1 when the forward was the inverse rotation.
//
// Deterministic for any thread count: tokens are cut into tiles whose size depends on the token
// count alone; each tile's partial sums (fp64, one row of rotary_dim / 2) are independent of
// which thread ran it, and the rows are added in tile order. Per token, the sum over heads is in
// the compute type (fp32; fp64 for fp64 inputs); the position factor and everything after it in
// fp64, so positions past 2^24 lose nothing.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/rope_grad_rows.h"
#include "rope_args.h"

namespace longattn::cpu {
namespace {

// At most this many tiles (partial rows), of at least kMinTileTokens tokens each.
constexpr int64_t kMaxTiles = 1024;
constexpr int64_t kMinTileTokens = 16;

template <typename T>
void rope_backward_kernel(const RopeParams& p) {
  using C = rope_rows::compute_t<T>;
  const int64_t tokens = p.tokens();
  const int64_t R = p.rotary_dim, half = R / 2;
  const std::vector<double> freq = rope_rows::frequencies(p);
  const C cos_mul = static_cast<C>(p.scaling);
  const C sin_mul = static_cast<C>(p.inverse ? -p.scaling : p.scaling);

  const int64_t tile = std::max(kMinTileTokens, (tokens + kMaxTiles - 1) / kMaxTiles);
  const int64_t n_tiles = (tokens + tile - 1) / tile;
  std::vector<double> partial(n_tiles * half, 0.0);
  int64_t heads = 0;
  for (int x = 0; x < p.n_tensors; ++x) heads += p.x[x].heads;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, tile * heads * R));

  parallel_for(n_tiles, grain, [&](int64_t begin, int64_t end) {
    // Per thread: the token's tables (cos, sin; cos2, sin2), the token's sums over heads
    // (R values, see pair_cross) and the scratch rows of the plain-loop path.
    std::vector<C> buf(2 * half + 2 * R + R + 3 * R);
    rope_rows::Tables<C> tab{buf.data(), buf.data() + half, buf.data() + R, buf.data() + 2 * R};
    C* acc = buf.data() + 3 * R;
    C* scratch = acc + R;
    std::vector<T> discard(p.x[0].out == nullptr ? R : 0);  // dx when it is not wanted
    for (int64_t ti = begin; ti < end; ++ti) {
      double* part = partial.data() + ti * half;
      for (int64_t t = ti * tile; t < std::min(tokens, (ti + 1) * tile); ++t) {
        const int64_t b = t / p.seqlen, l = t % p.seqlen;
        const int64_t pos = p.position(b, l);
        rope_rows::position_tables<C>(pos, freq.data(), half, cos_mul, sin_mul, p.interleaved, tab);
        std::fill(acc, acc + R, C(0));
        for (int x = 0; x < p.n_tensors; ++x) {
          const RopeTensor& v = p.x[x];
          for (int64_t h = 0; h < v.heads; ++h) {
            const T* g = static_cast<const T*>(v.in) + b * v.in_stride_b + l * v.in_stride_l +
                         h * v.in_stride_h;
            const T* xs = static_cast<const T*>(v.saved) + b * v.saved_stride_b +
                          l * v.saved_stride_l + h * v.saved_stride_h;
            T* dx = v.out == nullptr ? discard.data()
                                     : static_cast<T*>(v.out) + b * v.out_stride_b +
                                           l * v.out_stride_l + h * v.out_stride_h;
            rope_rows::grad_row<T, C>(g, xs, dx, tab, R, p.interleaved, acc, scratch);
            if (v.out != nullptr && p.copy_tail && v.head_dim > R) {
              std::memcpy(dx + R, g + R, (v.head_dim - R) * sizeof(T));
            }
          }
        }
        const double dpos = static_cast<double>(pos);
        for (int64_t i = 0; i < half; ++i) {
          part[i] += dpos * static_cast<double>(rope_rows::pair_cross(acc, i, p.interleaved));
        }
      }
    }
  });

  const double sign = p.forward_angle_sign();
  for (int64_t i = 0; i < half; ++i) {
    double sum = 0.0;
    for (int64_t ti = 0; ti < n_tiles; ++ti) sum += partial[ti * half + i];
    if (p.inv_freq_fp64) {
      static_cast<double*>(p.grad_inv_freq)[i] = sign * sum;
    } else {
      static_cast<float*>(p.grad_inv_freq)[i] = static_cast<float>(sign * sum);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_backward_cpu(
    const at::Tensor& dq_out, const std::optional<at::Tensor>& dk_out, const at::Tensor& q,
    const std::optional<at::Tensor>& k, const at::Tensor& positions, const at::Tensor& inv_freq,
    double attention_scaling, int64_t rotary_dim, bool interleaved, bool inverse,
    bool input_grads) {
  auto [p, dq, dk, dinv_freq] = make_rope_backward(dq_out, dk_out, q, k, positions, inv_freq,
                                                   attention_scaling, rotary_dim, interleaved,
                                                   inverse, input_grads);
  const RopeParams& params = p;
  LONGATTN_ROPE_DISPATCH(dq_out.scalar_type(), "longattn::rope_backward",
                         [&] { rope_backward_kernel<scalar_t>(params); });
  return {dq, dk, dinv_freq};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CPU, m) { m.impl("rope_backward", &rope_backward_cpu); }

}  // namespace longattn::cpu
