// Matrix-vector products on raw row-major pointers: the one-row (batch 1) passes of the CPU
// kernels, where each product streams a factor once and is bound by memory, not arithmetic.
//
// Why not BLAS gemv: at these shapes (a 4096×16 factor, a 16-long vector) MKL's sgemv and sgemm
// took 1.3–1.6× the time of these loops on the 2-core EPYC (bench/RESULTS.md, 2026-12-01). The
// loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time (GCC
// target_clones); blas.cpp splits large ones over threads.
#pragma once

#include <cstdint>

namespace lowrank_ext::cpu {

// y (w) = alpha · xᵀ A + beta · y, A row-major k×w with row stride lda (y[j] = Σ_i x[i] A[i, j]).
// beta == 0 overwrites y (NaN in y is not propagated). k == 0 gives beta · y.
template <typename T>
void vec_mat(int64_t k, int64_t w, T alpha, const T* x, const T* A, int64_t lda, T beta, T* y);

// y (w) = alpha · A x + beta · y, A row-major w×k with row stride lda (y[j] = Σ_i A[j, i] x[i]).
// Same conventions.
template <typename T>
void mat_vec(int64_t w, int64_t k, T alpha, const T* A, int64_t lda, const T* x, T beta, T* y);

// C (m×n, row stride ldc) = alpha · a bᵀ + beta · C: an outer product (a GEMM with k = 1, as a
// one-row backward's dU = dyᵀ z and dV = xᵀ dt), a[i] at a + i·inc_a, b contiguous.
template <typename T>
void outer(int64_t m, int64_t n, T alpha, const T* a, int64_t inc_a, const T* b, T beta, T* C,
           int64_t ldc);

}  // namespace lowrank_ext::cpu
