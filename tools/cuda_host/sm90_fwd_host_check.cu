// Host-side checks of the Hopper forward's layouts and limits (no GPU needed):
//  - the (row, column) view of the wgmma accumulator: one row per mode-0 index, the quad of
//    lanes sharing it, each score and output entry held by one consumer thread, column pairs
//    adjacent (the epilogue's 4-byte stores);
//  - the 16-bit S accumulator viewed as the A operand of the RS wgmma matches CuTe's A
//    partition value by value;
//  - the transposed V view addresses V, the TMA box sizes, the shared memory and the register
//    split fit an SM;
//  - the key-tile schedule at the kernel's tile shape (key_tile_schedule_check.h);
//  - sm90_unsupported's answers.
// Build and run: tests/test_sm90_host_check.py.
#include <cstdio>
#include <vector>

#include "common/attention_params.h"
#include "cuda/attention/sm90/fwd_traits.h"
#include "cuda/attention/sm90/support.h"
#include "cuda/attention/sm90/wgmma_utils.h"
#include "host_check.h"
#include "key_tile_schedule_check.h"

using namespace cute;
using namespace longattn;
using namespace longattn::cuda;
using namespace longattn::cuda::sm90;
using longattn::host_check::check_schedule;

constexpr int kMaxSmemPerBlock = 227 * 1024;  // sm_90's opt-in limit per block
constexpr int kRegistersPerSm = 64 * 1024;

template <class Tr>
void check_layouts(const char* name) {
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, D = Tr::kHeadDim;
  typename Tr::TiledMmaQK mma_qk;
  typename Tr::TiledMmaPV mma_pv;
  std::vector<int> seen_s(M * N, 0), seen_o(M * D, 0);
  const auto rowcol = [](const auto& c) { return make_tensor(c.data(), acc_rowcol_layout(c.layout())); };
  for (int t = 0; t < Tr::kConsumerThreads; ++t) {
    Tensor cs = mma_qk.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor co = mma_pv.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
    Tensor cs_rc = rowcol(cs);
    Tensor co_rc = rowcol(co);
    CHECK(size<0>(cs_rc) == size<0>(co_rc), "%s rows per thread", name);
    for (int mi = 0; mi < size<0>(cs_rc); ++mi) {
      const int r = get<0>(cs_rc(mi, 0));
      CHECK(r / 64 == t / 128, "%s t%d: row %d outside its warpgroup's 64 rows", name, t, r);
      CHECK(get<0>(co_rc(mi, 0)) == r, "%s t%d: score and output rows differ", name, t);
      for (int ni = 0; ni < size<1>(cs_rc); ++ni) {
        CHECK(get<0>(cs_rc(mi, ni)) == r, "%s t%d: row not constant along mode 1", name, t);
        ++seen_s[r * N + get<1>(cs_rc(mi, ni))];
      }
      for (int ni = 0; ni < size<1>(co_rc); ++ni) {
        CHECK(get<0>(co_rc(mi, ni)) == r, "%s t%d: output row not constant", name, t);
        ++seen_o[r * D + get<1>(co_rc(mi, ni))];
        if (ni % 2 == 0) {
          const int c = get<1>(co_rc(mi, ni));
          CHECK(c % 2 == 0 && get<1>(co_rc(mi, ni + 1)) == c + 1, "%s t%d: output column pair", name, t);
        }
      }
      for (int q = 0; q < 4; ++q) {
        const int u = (t & ~3) | q;
        Tensor cu = rowcol(mma_qk.get_thread_slice(u).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{})));
        CHECK(get<0>(cu(mi, 0)) == r, "%s t%d: quad lane %d holds another row", name, t, u);
      }
    }
    CHECK((get<1>(cs_rc(0, 0)) == 0) == (t % 4 == 0), "%s t%d: quad leader", name, t);

    Tensor ca = mma_pv.get_thread_slice(t).partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor cp = make_tensor(cs.data(), acc_as_a_layout(cs.layout()));
    CHECK(size(ca) == size(cp) && size<1>(ca) == size<1>(cp) && size<2>(ca) == size<2>(cp),
          "%s: P fragment shape", name);
    for (int k = 0; k < size<2>(ca); ++k)
      for (int m = 0; m < size<1>(ca); ++m)
        for (int v = 0; v < size<0>(ca); ++v)
          CHECK(ca(v, m, k) == cp(v, m, k), "%s t%d: P fragment (%d,%d,%d) misplaced", name, t, v, m, k);
  }
  for (int i = 0; i < M * N; ++i) CHECK(seen_s[i] == 1, "%s: score entry %d held %d times", name, i, seen_s[i]);
  for (int i = 0; i < M * D; ++i) CHECK(seen_o[i] == 1, "%s: output entry %d held %d times", name, i, seen_o[i]);

  typename Tr::SmemLayoutKV kv;
  typename Tr::SmemLayoutVt vt;
  for (int s = 0; s < Tr::kStages; ++s)
    for (int d = 0; d < D; ++d)
      for (int n = 0; n < N; ++n) CHECK(vt(d, n, s) == kv(n, d, s), "%s: V^T view", name);

  using Element = typename Tr::Element;
  CHECK(Tr::kTmaBytesQ == cosize(typename Tr::SmemLayoutQ{}) * sizeof(Element), "%s: Q box bytes", name);
  CHECK(Tr::kTmaBytesKV * Tr::kStages == cosize(kv) * sizeof(Element), "%s: K/V box bytes", name);
  CHECK(Tr::kSmemBytes <= kMaxSmemPerBlock, "%s: %d bytes of shared memory", name, Tr::kSmemBytes);
  CHECK(Tr::kProducerRegs * 128 + Tr::kConsumerRegs * Tr::kConsumerThreads <= kRegistersPerSm,
        "%s: register split", name);
  std::printf("%s: layouts ok (smem %d bytes)\n", name, Tr::kSmemBytes);
}

void check_support() {
  AttentionParams p;
  p.batch = 2;
  p.heads_q = 8;
  p.heads_kv = 2;
  p.head_dim = 128;
  p.seqlen_q = p.seqlen_k = 1000;
  CHECK(sm90_unsupported(p, KernelDtype::kBFloat16).empty(), "bf16 hd128 dense is covered");
  CHECK(sm90_unsupported(p, KernelDtype::kFloat16).empty(), "fp16 hd128 dense is covered");
  p.score.has_sink_logit = true;
  p.score.inv_log_logn_base = 0.5;
  CHECK(sm90_unsupported(p, KernelDtype::kFloat16).empty(), "sink logits and log-n are covered");
  CHECK(!sm90_unsupported(p, KernelDtype::kFloat32).empty(), "fp32 falls back");
  AttentionParams q = p;
  q.head_dim = 96;
  CHECK(!sm90_unsupported(q, KernelDtype::kFloat16).empty(), "hd96 falls back");
  q = p;
  q.score.softcap = 30.0;
  CHECK(!sm90_unsupported(q, KernelDtype::kFloat16).empty(), "softcap falls back");
  q = p;
  q.score.has_alibi = true;
  CHECK(!sm90_unsupported(q, KernelDtype::kFloat16).empty(), "ALiBi falls back");
  q = p;
  const int32_t cu[2] = {0, 10};
  q.cu_seqlens_q = q.cu_seqlens_k = cu;
  CHECK(!sm90_unsupported(q, KernelDtype::kFloat16).empty(), "varlen falls back");
  std::printf("support ok\n");
}

int main() {
  check_layouts<FwdTraits<half_t, 128>>("fp16 hd128");
  check_layouts<FwdTraits<bfloat16_t, 128>>("bf16 hd128");
  check_layouts<FwdTraits<half_t, 64>>("fp16 hd64");
  check_layouts<FwdTraits<bfloat16_t, 64>>("bf16 hd64");
  check_schedule<FwdTraits<half_t, 128>::kBlockM, FwdTraits<half_t, 128>::kBlockN>(400);
  check_support();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
