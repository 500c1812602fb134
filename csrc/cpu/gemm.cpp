#include "cpu/gemm.h"

#include <algorithm>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

extern "C" {
// Fortran BLAS, column-major, LP64 integers. Weak: null when torch does not export them.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
// MKL's per-thread cap on its own threads; returns the previous setting (0: the global one).
// The C entry point: the lower-case name is the Fortran one, taking a pointer.
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace longattn::cpu {
namespace {

template <typename T>
bool have_blas() {
  if constexpr (sizeof(T) == 4) return sgemm_ != nullptr;
  return dgemm_ != nullptr;
}

// Row-major C = op(A) B through column-major BLAS: ask for C^T = B^T op(A)^T.
template <typename T>
void blas(bool trans_a, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  const char tb = 'N', ta = trans_a ? 'T' : 'N';
  const T one = 1;
  // A tile GEMM runs on the calling thread (the kernels parallelize over tiles). MKL plans its
  // blocking for the threads it may use, and those differ between torch's thread counts, so
  // without the cap the same tile could be summed in another order (other bits) with
  // another torch.set_num_threads.
  const int mkl_threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
  if constexpr (sizeof(T) == 4) {
    sgemm_(&tb, &ta, &M, &N, &K, &one, B, &LDA, A, &LDB, &beta, C, &LDC);
  } else {
    dgemm_(&tb, &ta, &M, &N, &K, &one, B, &LDA, A, &LDB, &beta, C, &LDC);
  }
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads);
}

// Portable fallback: i-p-j loops the compiler vectorizes along j.
template <typename T>
void loops(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col,
           const T* B, int64_t ldb, bool accumulate, T* C, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + n, T(0));
    for (int64_t p = 0; p < k; ++p) {
      const T a = A[i * a_row + p * a_col];
      const T* b = B + p * ldb;
      for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
    }
  }
}

template <typename T>
void gemm_generic(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col,
                  const T* B, int64_t ldb, bool accumulate, T* C, int64_t ldc) {
  // BLAS needs A as a row-major (lda >= k) or transposed (lda >= m) matrix; with one row or
  // one column the unused stride is free, so lift it to the minimum BLAS accepts.
  if (have_blas<T>()) {
    const T beta = accumulate ? T(1) : T(0);
    if (a_col == 1 && (m == 1 || a_row >= k))
      return blas<T>(false, m, n, k, A, std::max(a_row, k), B, ldb, beta, C, ldc);
    if (a_row == 1 && (k == 1 || a_col >= m))
      return blas<T>(true, m, n, k, A, std::max(a_col, m), B, ldb, beta, C, ldc);
  }
  loops<T>(m, n, k, A, a_row, a_col, B, ldb, accumulate, C, ldc);
}

#if defined(__AVX512F__)
// Register-blocked kernel: an MR x (NV*16) block of C lives in MR*NV zmm accumulators; each
// step p broadcasts MR values of A and loads NV vectors of B's row p. The last vector of a
// row may be partial (mask), so n needs no padding.
template <int MR, int NV>
inline void kernel(int64_t k, const float* A, int64_t a_row, int64_t a_col, const float* B,
                   int64_t ldb, bool accumulate, float* C, int64_t ldc, __mmask16 tail) {
  // Every loop over MR or NV is unrolled so the accumulators stay in registers (without the
  // pragmas GCC keeps the array on the stack and spills every step).
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mv = v == NV - 1 ? tail : __mmask16(0xFFFF);
      c[i][v] = accumulate ? _mm512_maskz_loadu_ps(mv, C + i * ldc + 16 * v) : _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(tail, B + p * ldb + 16 * v)
                         : _mm512_loadu_ps(B + p * ldb + 16 * v);
    }
    const float* a = A + p * a_col;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(ai, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mv = v == NV - 1 ? tail : __mmask16(0xFFFF);
      _mm512_mask_storeu_ps(C + i * ldc + 16 * v, mv, c[i][v]);
    }
  }
}

template <int NV>
inline void row_blocks(int64_t m, int64_t k, const float* A, int64_t a_row, int64_t a_col,
                       const float* B, int64_t ldb, bool acc, float* C, int64_t ldc,
                       __mmask16 tail) {
  // 24 accumulators for full-width blocks leave room for the B vectors and a broadcast.
  constexpr int MR = NV >= 4 ? 6 : (NV == 3 ? 8 : (NV == 2 ? 12 : 16));
  int64_t i = 0;
  for (; i + MR <= m; i += MR)
    kernel<MR, NV>(k, A + i * a_row, a_row, a_col, B, ldb, acc, C + i * ldc, ldc, tail);
  // The leftover rows in one call: each row kernel alone would reload B per row.
  const float* Ai = A + i * a_row;
  float* Ci = C + i * ldc;
  switch (m - i) {
    case 0: break;
    case 1: kernel<1, NV>(k, Ai, a_row, a_col, B, ldb, acc, Ci, ldc, tail); break;
    case 2: kernel<2, NV>(k, Ai, a_row, a_col, B, ldb, acc, Ci, ldc, tail); break;
    case 3: kernel<3, NV>(k, Ai, a_row, a_col, B, ldb, acc, Ci, ldc, tail); break;
    case 4: kernel<4, NV>(k, Ai, a_row, a_col, B, ldb, acc, Ci, ldc, tail); break;
    case 5: kernel<5, NV>(k, Ai, a_row, a_col, B, ldb, acc, Ci, ldc, tail); break;
    default:  // MR > 6 only for narrow blocks: split the rest in halves
      for (int64_t r = i; r < m; r += 4) {
        const int64_t rows = std::min<int64_t>(4, m - r);
        const float* Ar = A + r * a_row;
        float* Cr = C + r * ldc;
        if (rows == 4) kernel<4, NV>(k, Ar, a_row, a_col, B, ldb, acc, Cr, ldc, tail);
        else if (rows == 3) kernel<3, NV>(k, Ar, a_row, a_col, B, ldb, acc, Cr, ldc, tail);
        else if (rows == 2) kernel<2, NV>(k, Ar, a_row, a_col, B, ldb, acc, Cr, ldc, tail);
        else kernel<1, NV>(k, Ar, a_row, a_col, B, ldb, acc, Cr, ldc, tail);
      }
  }
}

// In-register transpose of a 16 x 16 float block: 32-bit, then 64-bit interleaves, then two
// rounds of 128-bit lane shuffles (64 shuffles per 256 elements instead of 256 scalar moves).
inline void transpose16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4g + c] holds, in each 128-bit lane k, column 4k + c of rows 4g..4g+3.
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) {
    _mm512_storeu_ps(dst + c * ld_dst, _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88));
    _mm512_storeu_ps(dst + (c + 8) * ld_dst, _mm512_shuffle_f32x4(t[c], t[c + 8], 0xdd));
  }
}

void gemm_avx512(int64_t m, int64_t n, int64_t k, const float* A, int64_t a_row, int64_t a_col,
                 const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  // Blocks of k keep a B panel (kc rows x at most 64 columns) in L1 across the row blocks.
  // Columns go in equal blocks of whole vectors: n = 96 as 48 + 48 (two 8 x 3-vector kernels)
  // rather than 64 + 32, whose 12 x 2-vector half does 24 FMAs per 14 loads.
  constexpr int64_t kc = 128;
  const int64_t n_blocks = (n + 63) / 64;
  const int64_t width = n_blocks > 0 ? (n + 16 * n_blocks - 1) / (16 * n_blocks) * 16 : 64;
  for (int64_t j = 0; j < n; j += width) {
    const int64_t nj = std::min<int64_t>(width, n - j);
    const int nv = static_cast<int>((nj + 15) / 16);
    const int rem = static_cast<int>(nj - 16 * (nv - 1));
    const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1u);
    for (int64_t p = 0; p < std::max<int64_t>(k, 1); p += kc) {
      const int64_t kk = std::min(kc, k - p);
      const bool acc = accumulate || p > 0;
      const float* Ap = A + p * a_col;
      const float* Bp = B + p * ldb + j;
      float* Cj = C + j;
      switch (nv) {
        case 4: row_blocks<4>(m, kk, Ap, a_row, a_col, Bp, ldb, acc, Cj, ldc, tail); break;
        case 3: row_blocks<3>(m, kk, Ap, a_row, a_col, Bp, ldb, acc, Cj, ldc, tail); break;
        case 2: row_blocks<2>(m, kk, Ap, a_row, a_col, Bp, ldb, acc, Cj, ldc, tail); break;
        default: row_blocks<1>(m, kk, Ap, a_row, a_col, Bp, ldb, acc, Cj, ldc, tail); break;
      }
    }
  }
}
#endif

}  // namespace

const char* gemm_backend() {
#if defined(__AVX512F__)
  return "avx512";
#else
  return sgemm_ != nullptr ? "mkl" : "loops";
#endif
}

template <>
void gemm<float>(int64_t m, int64_t n, int64_t k, const float* A, int64_t a_row, int64_t a_col,
                 const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
#if defined(__AVX512F__)
  gemm_avx512(m, n, k, A, a_row, a_col, B, ldb, accumulate, C, ldc);
#else
  gemm_generic<float>(m, n, k, A, a_row, a_col, B, ldb, accumulate, C, ldc);
#endif
}

template <>
void gemm<double>(int64_t m, int64_t n, int64_t k, const double* A, int64_t a_row, int64_t a_col,
                  const double* B, int64_t ldb, bool accumulate, double* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  gemm_generic<double>(m, n, k, A, a_row, a_col, B, ldb, accumulate, C, ldc);
}

template <typename T>
void transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  // 16 x 16 blocks keep both the reads and the writes within a few cache lines.
  constexpr int64_t bs = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += bs) {
    const int64_t r1 = std::min(rows, r0 + bs);
    for (int64_t c0 = 0; c0 < cols; c0 += bs) {
      const int64_t c1 = std::min(cols, c0 + bs);
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        if (r1 - r0 == bs && c1 - c0 == bs) {
          transpose16x16(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
          continue;
        }
      }
#endif
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  }
}

template void transpose<float>(const float*, int64_t, int64_t, int64_t, float*, int64_t);
template void transpose<double>(const double*, int64_t, int64_t, int64_t, double*, int64_t);

}  // namespace longattn::cpu
