// Host-side checks of the flash forward's layout and schedule logic (no GPU needed):
//  - the (row, column) view of MMA accumulators, the quad that shares a row, and the view of
//    the score accumulator as the A operand of the P V MMA agree with CuTe's partitions;
//  - global-memory copy partitions keep one row per (m) index, so row predicates are exact;
//  - V's transposed shared-memory view addresses the same element as V;
//  - KeyTiles + MaskParams::classify + TileMask visit every visible key of a query tile
//    exactly once, never mark a tile full that has an invisible pair, and TileMask equals
//    MaskParams::visible, on random masks.
// Build and run: tests/test_flash_host_check.py (or by hand with nvcc -std=c++20
// --expt-relaxed-constexpr -I csrc -I <cutlass include>).
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <vector>

#include "cuda/attention/flash/fwd_kernel.h"
#include "cuda/attention/flash/fwd_traits.h"
#include "host_check.h"
#include "key_tile_schedule_check.h"

using namespace cute;
using namespace longattn;
using namespace longattn::cuda;
using namespace longattn::cuda::flash;
using longattn::host_check::check_schedule;

template <class Tr>
void check_layouts(const char* name) {
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, D = Tr::kHeadDim;
  typename Tr::TiledMma mma;
  std::vector<int> seen_s(M * N, 0), seen_o(M * D, 0);
  for (int t = 0; t < Tr::kNThreads; ++t) {
    auto thr = mma.get_thread_slice(t);
    Tensor cs = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor co = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
    Tensor cs_rc = make_tensor(cs.data(), acc_rowcol_layout(cs.layout()));
    Tensor co_rc = make_tensor(co.data(), acc_rowcol_layout(co.layout()));
    CHECK(size<0>(cs_rc) == size<0>(co_rc), "%s rows per thread", name);
    for (int mi = 0; mi < size<0>(cs_rc); ++mi) {
      const int r = get<0>(cs_rc(mi, 0));
      CHECK(get<0>(co_rc(mi, 0)) == r, "%s t%d: score and output rows differ", name, t);
      for (int ni = 0; ni < size<1>(cs_rc); ++ni) {
        CHECK(get<0>(cs_rc(mi, ni)) == r, "%s t%d: row not constant along mode 1", name, t);
        CHECK(get<1>(cs_rc(mi, ni)) == get<1>(cs_rc(0, ni)), "%s t%d: column varies", name, t);
        ++seen_s[r * N + get<1>(cs_rc(mi, ni))];
      }
      for (int ni = 0; ni < size<1>(co_rc); ++ni) {
        CHECK(get<0>(co_rc(mi, ni)) == r, "%s t%d: output row not constant", name, t);
        ++seen_o[r * D + get<1>(co_rc(mi, ni))];
      }
      // The quad (lanes 4g..4g+3) shares the row; lane 4g holds column 0 (it writes the lse).
      for (int q = 0; q < 4; ++q) {
        const int u = (t & ~3) | q;
        Tensor cu = mma.get_thread_slice(u).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
        Tensor cu_rc = make_tensor(cu.data(), acc_rowcol_layout(cu.layout()));
        CHECK(get<0>(cu_rc(mi, 0)) == r, "%s t%d: quad lane %d holds another row", name, t, u);
      }
    }
    CHECK((get<1>(cs_rc(0, 0)) == 0) == (t % 4 == 0), "%s t%d: quad leader", name, t);

    // P as the A operand of P V: same coordinates, value by value, as CuTe's A partition.
    Tensor ca = thr.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor cp = make_tensor(cs.data(), acc_as_a_layout(cs.layout()));
    CHECK(size(ca) == size(cp), "%s: A fragment size", name);
    CHECK(size<1>(ca) == size<1>(cp) && size<2>(ca) == size<2>(cp), "%s: A fragment modes", name);
    for (int k = 0; k < size<2>(ca); ++k)
      for (int m = 0; m < size<1>(ca); ++m)
        for (int v = 0; v < size<0>(ca); ++v)
          CHECK(ca(v, m, k) == cp(v, m, k), "%s t%d: P fragment (%d,%d,%d) misplaced", name, t, v, m, k);

    // Global copies: every value of a (., m, .) slice lies in one row.
    const auto one_row_per_slice = [&](const auto& c, const char* what) {
      for (int m = 0; m < size<1>(c); ++m)
        for (int k = 0; k < size<2>(c); ++k)
          for (int v = 0; v < size<0>(c); ++v)
            CHECK(get<0>(c(v, m, k)) == get<0>(c(0, m, 0)), "%s: %s slice spans rows", name, what);
    };
    typename Tr::GmemLoad load;
    typename Tr::GmemStore store;
    one_row_per_slice(load.get_thread_slice(t).partition_S(make_identity_tensor(Shape<Int<N>, Int<D>>{})), "K/V load");
    one_row_per_slice(load.get_thread_slice(t).partition_S(make_identity_tensor(Shape<Int<M>, Int<D>>{})), "Q load");
    one_row_per_slice(store.get_thread_slice(t).partition_D(make_identity_tensor(Shape<Int<M>, Int<D>>{})), "O store");
  }
  for (int i = 0; i < M * N; ++i) CHECK(seen_s[i] == 1, "%s: score entry %d held %d times", name, i, seen_s[i]);
  for (int i = 0; i < M * D; ++i) CHECK(seen_o[i] == 1, "%s: output entry %d held %d times", name, i, seen_o[i]);

  // Copy partitions cover their tiles exactly once.
  std::vector<int> cover(N * D, 0), cover_q(M * D, 0), cover_o(M * D, 0);
  for (int t = 0; t < Tr::kNThreads; ++t) {
    typename Tr::GmemLoad load;
    Tensor c = load.get_thread_slice(t).partition_S(make_identity_tensor(Shape<Int<N>, Int<D>>{}));
    for (int i = 0; i < size(c); ++i) ++cover[get<0>(c(i)) * D + get<1>(c(i))];
    Tensor cq = load.get_thread_slice(t).partition_S(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
    for (int i = 0; i < size(cq); ++i) ++cover_q[get<0>(cq(i)) * D + get<1>(cq(i))];
    typename Tr::GmemStore store;
    Tensor c2 = store.get_thread_slice(t).partition_D(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
    for (int i = 0; i < size(c2); ++i) ++cover_o[get<0>(c2(i)) * D + get<1>(c2(i))];
  }
  for (int i = 0; i < N * D; ++i) CHECK(cover[i] == 1, "%s: K/V load covers %d %d times", name, i, cover[i]);
  for (int i = 0; i < M * D; ++i) CHECK(cover_q[i] == 1, "%s: Q load covers %d %d times", name, i, cover_q[i]);
  for (int i = 0; i < M * D; ++i) CHECK(cover_o[i] == 1, "%s: O store covers %d %d times", name, i, cover_o[i]);

  // Shared memory: V^T(d, n) is V(n, d); buffers are dense.
  typename Tr::SmemLayoutKV kv;
  typename Tr::SmemLayoutVt vt;
  for (int d = 0; d < D; ++d)
    for (int n = 0; n < N; ++n) CHECK(vt(d, n) == kv(n, d), "%s: V^T view", name);
  CHECK(Tr::kSmemQElems == M * D && Tr::kSmemKVElems == N * D, "%s: smem sizes", name);
  std::printf("%s: layouts ok (smem %d bytes)\n", name, Tr::kSmemBytes);
}

int main() {
  check_layouts<FwdTraits<half_t, 64, FlashDeviceOps>>("fp16 hd64");
  check_layouts<FwdTraits<half_t, 128, FlashDeviceOps>>("fp16 hd128");
  check_layouts<FwdTraits<bfloat16_t, 64, FlashDeviceOps>>("bf16 hd64");
  check_layouts<FwdTraits<bfloat16_t, 128, FlashDeviceOps>>("bf16 hd128");
  check_layouts<FwdTraits<half_t, 96, FlashDeviceOps>>("fp16 hd96");
  check_layouts<FwdTraits<bfloat16_t, 96, FlashDeviceOps>>("bf16 hd96");
  check_layouts<FwdTraits<half_t, 256, FlashDeviceOps>>("fp16 hd256");
  check_layouts<FwdTraits<bfloat16_t, 256, FlashDeviceOps>>("bf16 hd256");
  // (query tile, key tile) of hd128 / hd256, hd64.
  check_schedule<128, 64>(400);
  check_schedule<64, 64>(400);
  check_schedule<128, 128>(400);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
