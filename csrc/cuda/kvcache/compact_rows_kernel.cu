// The moves of an in-place compaction (compact_, compact_rerotate_, compact_paged_), after
// compact_validate_kernel.cu: slot keep[j] of (b, h) moves to slot j, its K re-rotated by the
// shift on the way (compact_rerotate_), with its positions and scores; paged, only the rows of
// the new blocks the plan does not remap.
//
// Why this shape: a compaction reads and writes each moved row once, so it should run at the
// copy bandwidth of a gather into a new buffer. A CTA therefore moves a chunk of whole rows
// (every 16-byte vector of K and V of rows [j0, j0 + rows)), a warp reading and writing
// contiguous row bytes; B * H * chunks CTAs fill the GPU whatever the batch. In place, a chunk
// must not overwrite a slot another chunk still has to read. Slots only move down (keep[j] >=
// j), so chunk c's destination rows [j0, j1) are read only by the rows j' with keep[j'] in
// [j0, j1): at most j1 - j0 consecutive rows from lo = the first j' with keep[j'] >= j0, i.e.
// chunks lo / rows and (lo + rows - 1) / rows, both at or below c. Each chunk
//   1. takes a ticket (atomicAdd): chunks of a head start in chunk order, so the chunks it may
//      wait for are running or done (no deadlock whatever order the hardware launches CTAs in);
//   2. loads its sources into registers, then publishes "read" (a fence, then its flag);
//   3. finds lo (a warp's 32-way search over keep) and waits for those two chunks' flags;
//   4. writes.
// The chunks read in parallel and mostly find their flags already set, so the moves run at
// the bandwidth of the row traffic; rows already in place (keep[j] == j, no shift) cost nothing,
// which a gather pays for.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kv_slots.h"
#include "common/rope_math.h"
#include "cuda/kvcache/compact_kernels.h"
#include "cuda/kvcache/kv_device.cuh"

namespace longattn::cuda {
namespace {

using namespace kv_device;

constexpr int kThreads = 256;
constexpr int kUnitsPerThread = 4;  // row units each thread holds in flight

// A row's units: the rotary part of K (NeoX: NR elements at i and at i + rotary_dim / 2;
// interleaved: NR contiguous elements, NR / 2 pairs), then the rest of K and all of V in runs
// of N elements (16 bytes when Vec).
struct RowUnits {
  int rot = 0, k_plain = 0, v = 0;
  int64_t k_plain_begin = 0;  // element offset of K's plain runs
  __host__ __device__ int total() const { return rot + k_plain + v; }
};

template <typename T, int N, int NR, bool Vec>
struct alignas(Vec ? 16 : alignof(T)) UnitData {
  T a[NR];  // the run (plain: its first N elements)
  T b[NR];  // NeoX rotary: the partner run at + rotary_dim / 2
};

template <typename T, int N, int NR, bool Vec, bool Rotate, bool Interleaved>
__global__ void __launch_bounds__(kThreads) compact_rows_kernel(const CompactParams p,
                                                                const CompactScratch s,
                                                                const RowUnits u) {
  using C = acc_t<T>;
  __shared__ int64_t ticket_s;
  __shared__ int64_t shift_s[kThreads];
  __shared__ int32_t move_s[kThreads];
  if (threadIdx.x == 0) ticket_s = atomicAdd(s.ticket, 1);
  __syncthreads();
  if (*s.error_flag != 0) return;  // the host reports it; nothing moves
  const int64_t rows = s.rows_per_chunk;
  const int64_t x = ticket_s / s.chunks, c = ticket_s % s.chunks, b = x / p.H, h = x % p.H;
  const int64_t n = p.keep_lengths[x], j0 = c * rows;
  int32_t* flag = s.read_done + x * s.chunks + c;
  if (j0 >= n) return;  // nobody reads what this chunk would write
  const int64_t j1 = j0 + rows < n ? j0 + rows : n;
  const int64_t* ix = p.keep + x * p.K;
  const int64_t bs = p.slots.block_size, M = p.slots.paged() ? p.C / bs : 0;
  const int32_t* plan = p.slots.paged() ? s.remap + 3 * x * M + M : nullptr;
  const int64_t half = p.rotary_dim / 2;
  const int tid = threadIdx.x;

  // ---- read: the meta of the chunk's rows (thread r: row j0 + r), then the units ----
  int64_t pos_v = 0;
  float score_v = 0.f;
  if (tid < j1 - j0) {
    const int64_t j = j0 + tid, src = ix[j];
    const bool skip = plan != nullptr && plan[j / bs] == kRemapped;
    const kv::Slot from = p.slots.locate(b, h, src);
    int64_t shift = 0;
    if (!skip && p.positions != nullptr) pos_v = p.positions[p.ps.offset(from, h)];
    if (!skip && p.scores != nullptr && src != j) score_v = p.scores[p.ss.offset(from, h)];
    if (Rotate && !skip) shift = p.new_positions[b * p.ns[0] + h * p.ns[1] + j * p.ns[2]] - pos_v;
    shift_s[tid] = shift;
    move_s[tid] = !skip && (src != j || Rotate);
  }
  __syncthreads();

  const int U = u.total();
  const T* kin = static_cast<const T*>(p.k);
  const T* vin = static_cast<const T*>(p.v);
  UnitData<T, N, NR, Vec> data[kUnitsPerThread];
  // Units w0 + tid + kThreads * i of the chunk: unit w of row w / U.
  auto read_units = [&](int64_t w0) {
#pragma unroll
    for (int i = 0; i < kUnitsPerThread; ++i) {
      const int64_t w = w0 + tid + static_cast<int64_t>(kThreads) * i;
      const int64_t r = w / U, unit = w % U;
      if (r >= j1 - j0 || !move_s[r]) continue;
      const kv::Slot from = p.slots.locate(b, h, ix[j0 + r]);
      if (unit < u.rot) {
        const T* row = kin + p.ks.offset(from, h) + unit * NR;
        reinterpret_cast<Elems<T, NR, Vec>*>(data[i].a)->load(row);
        if constexpr (!Interleaved) {
          reinterpret_cast<Elems<T, NR, Vec>*>(data[i].b)->load(row + half);
        }
      } else if (unit < u.rot + u.k_plain) {
        const T* row = kin + p.ks.offset(from, h) + u.k_plain_begin + (unit - u.rot) * N;
        reinterpret_cast<Elems<T, N, Vec>*>(data[i].a)->load(row);
      } else {
        const T* row = vin + p.vs.offset(from, h) + (unit - u.rot - u.k_plain) * N;
        reinterpret_cast<Elems<T, N, Vec>*>(data[i].a)->load(row);
      }
    }
  };
  auto write_units = [&](int64_t w0) {
#pragma unroll
    for (int i = 0; i < kUnitsPerThread; ++i) {
      const int64_t w = w0 + tid + static_cast<int64_t>(kThreads) * i;
      const int64_t r = w / U, unit = w % U;
      if (r >= j1 - j0 || !move_s[r]) continue;
      const bool in_place = ix[j0 + r] == j0 + r;  // only re-rotated: its other runs stay
      const kv::Slot to = p.slots.locate(b, h, j0 + r);
      if (unit < u.rot) {
        const int64_t shift = shift_s[r];
        const int64_t i0 = unit * NR;  // first element of the run
        if (shift != 0) {
          constexpr int kPairs = Interleaved ? NR / 2 : NR;
#pragma unroll
          for (int e = 0; e < kPairs; ++e) {
            const int64_t pair = Interleaved ? i0 / 2 + e : i0 + e;
            const double f =
                p.inv_freq_fp64 ? static_cast<const double*>(p.inv_freq)[pair]
                                : static_cast<double>(static_cast<const float*>(p.inv_freq)[pair]);
            C sn, cs, y0, y1;
            rope::rope_sincos<C>(shift, f, &sn, &cs);
            T& a0 = Interleaved ? data[i].a[2 * e] : data[i].a[e];
            T& a1 = Interleaved ? data[i].a[2 * e + 1] : data[i].b[e];
            rope::rotate_pair<C>(to_acc(a0), to_acc(a1), cs, sn, &y0, &y1);
            a0 = from_acc<T>(y0);
            a1 = from_acc<T>(y1);
          }
        } else if (in_place) {
          continue;  // neither moved nor rotated
        }
        T* row = static_cast<T*>(p.k) + p.ks.offset(to, h) + i0;
        reinterpret_cast<const Elems<T, NR, Vec>*>(data[i].a)->store(row);
        if constexpr (!Interleaved) {
          reinterpret_cast<const Elems<T, NR, Vec>*>(data[i].b)->store(row + half);
        }
      } else if (in_place) {
        continue;
      } else if (unit < u.rot + u.k_plain) {
        T* row = static_cast<T*>(p.k) + p.ks.offset(to, h) + u.k_plain_begin + (unit - u.rot) * N;
        reinterpret_cast<const Elems<T, N, Vec>*>(data[i].a)->store(row);
      } else {
        T* row = static_cast<T*>(p.v) + p.vs.offset(to, h) + (unit - u.rot - u.k_plain) * N;
        reinterpret_cast<const Elems<T, N, Vec>*>(data[i].a)->store(row);
      }
    }
  };
  auto publish = [&] {  // after a barrier that follows every read of the CTA
    if (tid == 0) {
      __threadfence();
      atomicExch(flag, 1);
    }
  };
  // A chunk of one row wider than the CTA's units (huge unaligned rows) takes several passes:
  // each thread writes only the units it read, of a row other than their source (or in place),
  // so the passes need no barrier; the flag then waits for the last read.
  const int64_t per_pass = static_cast<int64_t>(kThreads) * kUnitsPerThread;
  const int64_t passes = ((j1 - j0) * U + per_pass - 1) / per_pass;

  // ---- read, publish, wait for the readers of this chunk's destination rows ----
  read_units(0);
  __syncthreads();
  if (passes == 1) publish();
  if (tid < 32) {
    // lo = the first j' with keep[j'] >= j0, in [j0 - (L - n), j0] (keep[j] - j grows to at
    // most L - n), by a 32-way search.
    const int64_t L = length_at(p.lengths, b, h);
    int64_t lo = j0 - (L - n) > 0 ? j0 - (L - n) : 0, hi = j0;
    while (lo < hi) {  // uniform over the warp
      const int64_t step = (hi - lo + 31) / 32;
      const int64_t q = lo + tid * step;
      const unsigned m = __ballot_sync(0xffffffffu, q >= hi || ix[q] >= j0);
      const int f = m != 0 ? __ffs(static_cast<int>(m)) - 1 : 32;  // the first probe past lo
      if (f == 0) {
        hi = lo;
      } else {
        if (f < 32 && lo + f * step < hi) hi = lo + f * step;
        lo += (f - 1) * step + 1;
      }
    }
    // The readers of rows [j0, j1) are at most j1 - j0 rows from lo: two chunks.
    const int64_t wait_chunk = tid == 0 ? lo / rows : (lo + rows - 1) / rows;
    if (tid < 2 && wait_chunk < c) {
      const volatile int32_t* f = s.read_done + x * s.chunks + wait_chunk;
      while (*f == 0) {
      }
    }
    __threadfence();
  }
  __syncthreads();

  // ---- write ----
  write_units(0);
  for (int64_t pass = 1; pass < passes; ++pass) {
    read_units(pass * per_pass);
    write_units(pass * per_pass);
  }
  if (passes > 1) {
    __syncthreads();
    publish();
  }
  if (tid < j1 - j0 && move_s[tid]) {
    const int64_t j = j0 + tid;
    const bool moved = ix[j] != j;
    const kv::Slot to = p.slots.locate(b, h, j);
    if (p.positions != nullptr && (Rotate || moved)) {
      p.positions[p.ps.offset(to, h)] =
          Rotate ? p.new_positions[b * p.ns[0] + h * p.ns[1] + j * p.ns[2]] : pos_v;
    }
    if (p.scores != nullptr && moved) p.scores[p.ss.offset(to, h)] = score_v;
  }
}

template <typename T, int N, int NR, bool Vec, bool Rotate, bool Interleaved>
cudaError_t launch_units(const CompactParams& p, const CompactScratch& s, const RowUnits& u,
                         cudaStream_t stream) {
  const int64_t ctas = p.B * p.H * s.chunks;
  if (ctas == 0) return cudaSuccess;
  if (ctas > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch_kernel(compact_rows_kernel<T, N, NR, Vec, Rotate, Interleaved>,
                       dim3(static_cast<unsigned>(ctas)), kThreads, 0, stream, p, s, u);
}

bool aligned16(const void* ptr, const kv::SlotStrides& st, int64_t elem) {
  const int64_t v = 16 / elem;
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && st.x % v == 0 && st.y % v == 0 &&
         st.h % v == 0;
}

// The row layout and the instantiation for p: 16-byte runs when every row start, stride and
// range is aligned, else single elements (pairs for interleaved rotary runs).
template <typename T, typename F>
auto with_layout(const CompactParams& p, F&& f) {
  constexpr int kV = 16 / sizeof(T);
  const bool rotate = p.new_positions != nullptr;
  const int64_t rd = rotate ? p.rotary_dim : 0, half = rd / 2;
  const bool vec = aligned16(p.k, p.ks, sizeof(T)) && aligned16(p.v, p.vs, sizeof(T)) &&
                   (p.D - rd) % kV == 0 && p.Dv % kV == 0 &&
                   (!rotate || (p.interleaved ? rd % kV == 0 : half % kV == 0));
  auto units = [&](int n, int nr) {
    RowUnits u;
    u.rot = rotate ? static_cast<int>((p.interleaved ? rd : half) / nr) : 0;
    u.k_plain_begin = rd;
    u.k_plain = static_cast<int>((p.D - rd) / n);
    u.v = static_cast<int>(p.Dv / n);
    return u;
  };
  using std::integral_constant;
  if (vec) {
    const RowUnits u = units(kV, kV);
    if (!rotate) return f(u, integral_constant<int, kV>{}, integral_constant<int, kV>{}, std::true_type{}, std::false_type{}, std::false_type{});
    if (p.interleaved) return f(u, integral_constant<int, kV>{}, integral_constant<int, kV>{}, std::true_type{}, std::true_type{}, std::true_type{});
    return f(u, integral_constant<int, kV>{}, integral_constant<int, kV>{}, std::true_type{}, std::true_type{}, std::false_type{});
  }
  if (!rotate) return f(units(1, 1), integral_constant<int, 1>{}, integral_constant<int, 1>{}, std::false_type{}, std::false_type{}, std::false_type{});
  if (p.interleaved) return f(units(1, 2), integral_constant<int, 1>{}, integral_constant<int, 2>{}, std::false_type{}, std::true_type{}, std::true_type{});
  return f(units(1, 1), integral_constant<int, 1>{}, integral_constant<int, 1>{}, std::false_type{}, std::true_type{}, std::false_type{});
}

template <typename T>
int64_t rows_per_chunk(const CompactParams& p) {
  return with_layout<T>(p, [&](const RowUnits& u, auto, auto, auto, auto, auto) {
    const int64_t per = static_cast<int64_t>(kThreads) * kUnitsPerThread / u.total();
    return per < 1 ? int64_t{1} : per > kThreads ? int64_t{kThreads} : per;
  });
}

template <typename T>
cudaError_t launch_typed(const CompactParams& p, const CompactScratch& s, cudaStream_t stream) {
  return with_layout<T>(p, [&](const RowUnits& u, auto n, auto nr, auto vec, auto rot, auto il) {
    if (static_cast<int64_t>(u.total()) * s.rows_per_chunk > kThreads * kUnitsPerThread &&
        s.rows_per_chunk > 1) {
      return cudaErrorInvalidValue;  // rows_per_chunk came from another layout
    }
    return launch_units<T, decltype(n)::value, decltype(nr)::value, decltype(vec)::value,
                        decltype(rot)::value, decltype(il)::value>(p, s, u, stream);
  });
}

template <typename F>
auto on_dtype(KernelDtype dtype, F&& f) {
  switch (dtype) {
    case KernelDtype::kFloat64: return f(double{});
    case KernelDtype::kFloat16: return f(__half{});
    case KernelDtype::kBFloat16: return f(__nv_bfloat16{});
    case KernelDtype::kFloat32: break;
  }
  return f(float{});
}

}  // namespace

int64_t compact_rows_per_chunk(const CompactParams& p, KernelDtype dtype) {
  return on_dtype(dtype, [&](auto zero) { return rows_per_chunk<decltype(zero)>(p); });
}

cudaError_t launch_compact_rows(const CompactParams& p, const CompactScratch& s,
                                KernelDtype dtype, cudaStream_t stream) {
  return on_dtype(dtype, [&](auto zero) { return launch_typed<decltype(zero)>(p, s, stream); });
}

}  // namespace longattn::cuda
