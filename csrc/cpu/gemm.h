// Small GEMMs for attention tiles: C = A * B with B row-major [k][n] and A read through
// general strides (row-major A, or A transposed), which covers every product of the forward
// and backward (S = Q K^T with K packed transposed, O += P V, dV += P^T dO, ...).
//
// float: a hand-written AVX-512 register-blocked kernel when built for AVX-512, else MKL's
// sgemm_ exported by the x86 torch wheels (bound weakly), else plain loops.
// double (the gradcheck path): dgemm_ or loops.
#pragma once
#include <cstdint>

namespace longattn::cpu {

// Which backend the float tile GEMMs use ("avx512", "mkl" or "loops"), for build_info.
const char* gemm_backend();

// C[m x n] = (accumulate ? C : 0) + sum_p A(i, p) * B[p * ldb + j], where
// A(i, p) = A[i * a_row + p * a_col]; one of a_row, a_col must be 1.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B,
          int64_t ldb, bool accumulate, T* C, int64_t ldc);

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols (packs K^T for Q K^T).
template <typename T>
void transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst);

}  // namespace longattn::cpu
