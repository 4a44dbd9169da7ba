// Row-major GEMM on raw pointers for the CPU kernels, through the BLAS that libtorch_cpu links
// (MKL on x86-64 wheels, OpenBLAS elsewhere).
//
// Why not at::mm_out: at inference batch sizes a GEMM is a few microseconds and each ATen call
// (dispatcher, a TensorImpl per view, output checks) costs about as much; a low-rank layer makes
// several of them a call. The Fortran entry points sgemm_/dgemm_ are declared weak: a libtorch
// whose BLAS does not export them still loads, and every GEMM then goes through at::addmm_out on
// views of the same memory (correct, only slower; cpu_blas_name() says which path runs).
#pragma once

#include <cstdint>

namespace lowrank_ext::cpu {

enum class Op : bool { N = false, T = true };

// C (m×n) = alpha · op(A) · op(B) + beta · C, all row-major with row strides lda, ldb, ldc.
// op(A) is m×k, op(B) is k×n. beta == 0 overwrites C (NaN in C is not propagated).
// Any of m, n, k may be 0. Defined for float and double.
template <typename T>
void gemm(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

// From this many bytes of factor on, a product of a few rows is split over torch's threads (never
// from inside a parallel region): the one-row forward of 4096 → 4096 at r = 64 took 39 µs on one
// thread and 29 µs split over two on the 2-core EPYC (bench/RESULTS.md, 2026-12-01).
constexpr int64_t kThreadSplitBytes = int64_t{256} << 10;

// "blas" when the BLAS entry points were found in the running libtorch, else "aten".
const char* cpu_blas_name();

}  // namespace lowrank_ext::cpu
