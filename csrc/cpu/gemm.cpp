#include "cpu/gemm.h"

extern "C" {
// Fortran BLAS, column-major, LP64 integers. Weak: null when torch does not export them.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
}

namespace longattn::cpu {
namespace {

// Column-major BLAS call computing row-major C = op(A) op(B): a row-major matrix is its
// column-major transpose, so we ask BLAS for C^T = op(B)^T op(A)^T.
template <typename T>
void blas(char tb, char ta, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  const T one = 1;
  if constexpr (sizeof(T) == 4) {
    sgemm_(&tb, &ta, &M, &N, &K, &one, B, &LDA, A, &LDB, &beta, C, &LDC);
  } else {
    dgemm_(&tb, &ta, &M, &N, &K, &one, B, &LDA, A, &LDB, &beta, C, &LDC);
  }
}

template <typename T>
bool have_blas() {
  if constexpr (sizeof(T) == 4) return sgemm_ != nullptr;
  return dgemm_ != nullptr;
}

// Fallback: i-k-j loops the compiler vectorizes along n.
template <typename T, bool TransA, bool TransB>
void loops(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
           T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* c = C + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < n; ++j) c[j] = 0;
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) c[j] *= beta;
    }
    if constexpr (TransB) {  // B is n x k: dot products
      const T* a = TransA ? nullptr : A + i * lda;
      for (int64_t j = 0; j < n; ++j) {
        const T* b = B + j * ldb;
        T acc = 0;
        for (int64_t p = 0; p < k; ++p) acc += (TransA ? A[p * lda + i] : a[p]) * b[p];
        c[j] += acc;
      }
    } else {
      for (int64_t p = 0; p < k; ++p) {
        const T a = TransA ? A[p * lda + i] : A[i * lda + p];
        const T* b = B + p * ldb;
        for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
      }
    }
  }
}

}  // namespace

const char* gemm_backend() { return sgemm_ != nullptr ? "mkl" : "loops"; }

template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (have_blas<T>() && k > 0) return blas<T>('T', 'N', m, n, k, A, lda, B, ldb, beta, C, ldc);
  loops<T, false, true>(m, n, k, A, lda, B, ldb, beta, C, ldc);
}

template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (have_blas<T>() && k > 0) return blas<T>('N', 'N', m, n, k, A, lda, B, ldb, beta, C, ldc);
  loops<T, false, false>(m, n, k, A, lda, B, ldb, beta, C, ldc);
}

template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (have_blas<T>() && k > 0) return blas<T>('N', 'T', m, n, k, A, lda, B, ldb, beta, C, ldc);
  loops<T, true, false>(m, n, k, A, lda, B, ldb, beta, C, ldc);
}

#define LONGATTN_GEMM_INSTANTIATE(T)                                                        \
  template void gemm_nt<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, \
                           T, T*, int64_t);                                                 \
  template void gemm_nn<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, \
                           T, T*, int64_t);                                                 \
  template void gemm_tn<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, \
                           T, T*, int64_t);
LONGATTN_GEMM_INSTANTIATE(float)
LONGATTN_GEMM_INSTANTIATE(double)
#undef LONGATTN_GEMM_INSTANTIATE

}  // namespace longattn::cpu
