// Small row-major GEMMs for attention tiles. The x86 torch wheels export MKL's Fortran
// sgemm_/dgemm_ from libtorch_cpu; we bind them weakly so a torch without them still loads
// and falls back to a plain blocked loop (correct, slower). torch's own cpublas cannot be
// called from an extension (its dispatch stubs are not exported).
#pragma once
#include <cstdint>

namespace longattn::cpu {

// Which backend the tile GEMMs use ("mkl" or "loops"), for build_info and benchmarks.
const char* gemm_backend();

// C[m x n] = A[m x k] * B[n x k]^T + beta * C        (S = Q K^T, dP = dO V^T, ...)
template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T beta, T* C, int64_t ldc);
// C[m x n] = A[m x k] * B[k x n] + beta * C          (O += P V, dQ += dS K)
template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T beta, T* C, int64_t ldc);
// C[m x n] = A[k x m]^T * B[k x n] + beta * C        (dV += P^T dO, dK += dS^T Q)
template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T beta, T* C, int64_t ldc);

}  // namespace longattn::cpu
