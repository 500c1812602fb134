// Host-side checks of the Hopper forward's layouts and limits (no GPU needed):
//  - the (row, column) view of the wgmma accumulator: one row per mode-0 index, the quad of
//    lanes sharing it, each score and output entry held by one consumer thread, column pairs
//    adjacent (the epilogue's 4-byte stores);
//  - the 16-bit S accumulator viewed as the A operand of the RS wgmma matches CuTe's A
//    partition value by value;
//  - the transposed V view addresses V, the TMA box sizes, the shared memory and the register
//    split fit an SM;
//  - the TMA descriptors (their encoding captured by a stand-in for the driver call) and the
//    producer's tiles: every coordinate of a Q tile and of a K/V tile at any key index lands on
//    the address of that element of q/k/v, rows past the sequence fall outside the descriptor
//    (zero-filled), 128-byte swizzle, and the boxes carry the bytes the barriers expect;
//  - the key-tile schedule at the kernel's tile shape (key_tile_schedule_check.h);
//  - sm90_unsupported's answers.
// Build and run: tests/test_sm90_host_check.py.
// make_tma_copy calls cuTensorMapEncodeTiled directly, so the definition below stands in for the
// driver (there is none on the build machines) and records what the host would encode.
#define CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL 1
#include <cuda.h>

#include <cstdio>
#include <vector>

#include "common/attention_params.h"
#include "cuda/attention/sm90/fwd_producer.h"
#include "cuda/attention/sm90/fwd_tma.h"
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

struct Encoded {
  unsigned rank;
  uint64_t addr;
  uint64_t dim[5], stride[5];  // stride[0]: the element size, as TMA steps the innermost dim
  uint32_t box[5];
  int swizzle;
};
static std::vector<Encoded> encoded;

CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap*, CUtensorMapDataType, cuuint32_t rank, void* addr,
                                        const cuuint64_t* dim, const cuuint64_t* strides, const cuuint32_t* box,
                                        const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle swizzle,
                                        CUtensorMapL2promotion, CUtensorMapFloatOOBfill) {
  Encoded e{};
  e.rank = rank;
  e.addr = reinterpret_cast<uint64_t>(addr);
  e.stride[0] = 2;  // 16-bit elements
  for (unsigned i = 0; i < rank && i < 5; ++i) {
    e.dim[i] = dim[i];
    e.box[i] = box[i];
    if (i > 0) e.stride[i] = strides[i - 1];
  }
  e.swizzle = static_cast<int>(swizzle);
  encoded.push_back(e);
  return CUDA_SUCCESS;
}

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

// Tile coordinates (TMA order) against the tensor: coordinate (r, c) of a tile whose row 0 is row
// `row0` of head `head`, sequence `b` must address element (row0 + r, c, head, b), and lie inside
// the descriptor exactly when that row is inside the sequence.
template <class Tile>
void check_tile(const char* name, const char* what, const Tile& g, const Encoded& e, int64_t row0, int64_t rows,
                int64_t head, int64_t b, int64_t row_stride, int64_t head_stride, int64_t batch_stride) {
  using namespace cute;
  for (int r = 0; r < size<0>(g); ++r) {
    for (int c = 0; c < size<1>(g); c += 7) {
      const auto x = g(r, c);
      const int64_t coord[4] = {get<0>(x), get<1>(x), get<2>(x), get<3>(x)};
      uint64_t addr = e.addr;
      bool inside = true;
      for (int i = 0; i < 4; ++i) {
        addr += coord[i] * e.stride[i];
        inside = inside && coord[i] >= 0 && coord[i] < static_cast<int64_t>(e.dim[i]);
      }
      const int64_t row = row0 + r;
      const uint64_t want = e.addr + 2 * (row * row_stride + c + head * head_stride + b * batch_stride);
      CHECK(inside == (row < rows), "%s %s (%d,%d): inside the descriptor %d, row %lld of %lld", name, what, r, c,
            inside, (long long)row, (long long)rows);
      if (row < rows) CHECK(addr == want, "%s %s (%d,%d): address off by %lld", name, what, r, c, (long long)(addr - want));
    }
  }
}

template <class Tr>
void check_tma(const char* name) {
  constexpr int D = Tr::kHeadDim;
  // q (B, L, H, D); k the same with GQA; v head-major (B, H, L, D) views; batch 1 with a zero
  // batch stride in the second round (an extent-1 dimension's stride is free).
  for (int round = 0; round < 2; ++round) {
    AttentionParams p;
    p.batch = round == 0 ? 3 : 1;
    p.heads_q = 8;
    p.heads_kv = 2;
    p.head_dim = D;
    p.seqlen_q = 300;
    p.seqlen_k = 517;
    p.q_row_stride = 8 * D, p.q_head_stride = D, p.q_batch_stride = round == 0 ? 300 * 8 * D : 0;
    p.k_row_stride = 2 * D, p.k_head_stride = D, p.k_batch_stride = round == 0 ? 517 * 2 * D : 0;
    p.v_row_stride = D, p.v_head_stride = 517 * D, p.v_batch_stride = round == 0 ? 2 * 517 * D : 0;
    p.q = reinterpret_cast<void*>(uintptr_t(1) << 32);
    p.k = reinterpret_cast<void*>(uintptr_t(2) << 32);
    p.v = reinterpret_cast<void*>(uintptr_t(3) << 32);
    encoded.clear();
    const FwdArgs<Tr> args = make_fwd_args<Tr>(p);
    CHECK(encoded.size() == 3, "%s: %zu descriptors encoded", name, encoded.size());
    if (encoded.size() != 3) return;
    const uint32_t rows_box[3] = {Tr::kBlockM, Tr::kBlockN, Tr::kBlockN};
    const uint32_t bytes[3] = {Tr::kTmaBytesQ, Tr::kTmaBytesKV, Tr::kTmaBytesKV};
    for (int i = 0; i < 3; ++i) {
      const Encoded& e = encoded[i];
      CHECK(e.rank == 4, "%s: descriptor rank %u", name, e.rank);
      CHECK(e.swizzle == CU_TENSOR_MAP_SWIZZLE_128B, "%s: swizzle %d", name, e.swizzle);
      CHECK(e.box[0] * 2 == 128 && e.box[1] == rows_box[i] && e.box[2] == 1 && e.box[3] == 1, "%s: box", name);
      // copy() issues one box per 64 head-dim columns; together they fill the barrier's bytes.
      CHECK(e.box[0] * e.box[1] * 2 * (D / e.box[0]) == bytes[i], "%s: box bytes", name);
      for (unsigned k = 1; k < e.rank; ++k) CHECK(e.stride[k] % 16 == 0 && e.stride[k] > 0, "%s: stride", name);
    }
    for (int m_block = 0; m_block < 3; ++m_block) {
      for (int64_t h : {int64_t(0), int64_t(5), int64_t(7)}) {
        const int64_t b = p.batch - 1;
        const QueryTile<Tr> w(p, m_block, h, b);
        check_tile(name, "Q", q_tile(args, w), encoded[0], w.i0, p.seqlen_q, h, b, p.q_row_stride,
                   p.q_head_stride, p.q_batch_stride);
        for (int j0 : {0, 37, 128, 450}) {
          check_tile(name, "K", kv_tile(args.tma_k, p, w, j0), encoded[1], j0, p.seqlen_k, w.hk, b,
                     p.k_row_stride, p.k_head_stride, p.k_batch_stride);
          check_tile(name, "V", kv_tile(args.tma_v, p, w, j0), encoded[2], j0, p.seqlen_k, w.hk, b,
                     p.v_row_stride, p.v_head_stride, p.v_batch_stride);
        }
      }
    }
  }
  std::printf("%s: TMA tiles ok\n", name);
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
  check_tma<FwdTraits<half_t, 128>>("fp16 hd128");
  check_tma<FwdTraits<bfloat16_t, 64>>("bf16 hd64");
  check_schedule<FwdTraits<half_t, 128>::kBlockM, FwdTraits<half_t, 128>::kBlockN>(400);
  check_support();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
