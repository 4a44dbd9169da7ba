// See blas.h.
#include "cpu/blas.h"

#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <climits>
#include <vector>

#include "cpu/gemv.h"

extern "C" {
// Fortran BLAS (column-major, arguments by reference, 32-bit integers: the LP64 interface that
// libtorch itself calls). Weak: absent symbols resolve to null instead of failing the load.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
void sgemv_(const char* trans, const int* m, const int* n, const float* alpha, const float* a,
            const int* lda, const float* x, const int* incx, const float* beta, float* y,
            const int* incy) __attribute__((weak));
void dgemv_(const char* trans, const int* m, const int* n, const double* alpha, const double* a,
            const int* lda, const double* x, const int* incx, const double* beta, double* y,
            const int* incy) __attribute__((weak));
}

namespace lowrank_ext::cpu {
namespace {

template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*,
                             const T*, const T*, const int*, const T*, const int*, const T*, T*,
                             const int*);

template <typename T>
using FortranGemv = void (*)(const char*, const int*, const int*, const T*, const T*, const int*,
                             const T*, const int*, const T*, T*, const int*);

template <typename T>
FortranGemm<T> fortran_gemm();
template <>
FortranGemm<float> fortran_gemm<float>() { return &sgemm_; }
template <>
FortranGemm<double> fortran_gemm<double>() { return &dgemm_; }
template <typename T>
FortranGemv<T> fortran_gemv();
template <>
FortranGemv<float> fortran_gemv<float>() { return &sgemv_; }
template <>
FortranGemv<double> fortran_gemv<double>() { return &dgemv_; }

// A product with a single output row or column is a matrix-vector product; BLAS gemm does not
// always notice, and at one row (batch 1) its setup costs more than the arithmetic.
template <typename T>
bool try_gemv(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A,
              int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const FortranGemv<T> gemv = fortran_gemv<T>();
  if (gemv == nullptr || (m != 1 && n != 1)) return false;
  char trans;
  int rows, cols, ld, inc_x, inc_y;
  const T *mat, *vec;
  if (m == 1) {  // c (n) = op(B)ᵀ a: B's rows read column-major, a is row 0 of op(A)
    mat = B;
    ld = static_cast<int>(ldb);
    trans = op_b == Op::N ? 'N' : 'T';
    rows = static_cast<int>(op_b == Op::N ? n : k);
    cols = static_cast<int>(op_b == Op::N ? k : n);
    vec = A;
    inc_x = op_a == Op::N ? 1 : static_cast<int>(lda);
    inc_y = 1;
  } else {  // c (m, as a column with stride ldc) = op(A) b
    mat = A;
    ld = static_cast<int>(lda);
    trans = op_a == Op::N ? 'T' : 'N';
    rows = static_cast<int>(op_a == Op::N ? k : m);
    cols = static_cast<int>(op_a == Op::N ? m : k);
    vec = B;
    inc_x = op_b == Op::N ? static_cast<int>(ldb) : 1;
    inc_y = static_cast<int>(ldc);
  }
  gemv(&trans, &rows, &cols, &alpha, mat, &ld, vec, &inc_x, &beta, C, &inc_y);
  return true;
}

// Whether a product over a rows × cols matrix is split over torch's threads (blas.h).
bool split(int64_t rows, int64_t cols, size_t elem) {
  return at::get_num_threads() > 1 && !at::in_parallel_region() && rows * cols > 1 &&
         rows * cols * static_cast<int64_t>(elem) >= kThreadSplitBytes;
}

int64_t grain(int64_t rows) { return at::divup(rows, at::get_num_threads()); }

// y = alpha · xᵀ A + beta · y split over threads: by columns where y is long (a transposed
// factor's rows, y = z Uᵀ), else by A's k rows, each thread summing its rows into its own
// partial, added up at the end.
template <typename T>
void vec_mat_split(int64_t k, int64_t w, T alpha, const T* x, const T* A, int64_t lda, T beta,
                   T* y) {
  if (!split(k, w, sizeof(T))) return vec_mat(k, w, alpha, x, A, lda, beta, y);
  if (w >= 256) {
    at::parallel_for(0, w, grain(w), [&](int64_t begin, int64_t end) {
      vec_mat(k, end - begin, alpha, x, A + begin, lda, beta, y + begin);
    });
    return;
  }
  const int64_t threads = at::get_num_threads();
  thread_local std::vector<T> partial;
  partial.assign(static_cast<size_t>(threads * w), T(0));
  T* sums = partial.data();
  at::parallel_for(0, k, grain(k), [&](int64_t begin, int64_t end) {
    vec_mat(end - begin, w, T(1), x + begin, A + begin * lda, lda, T(0),
            sums + at::get_thread_num() * w);
  });
  for (int64_t j = 0; j < w; ++j) {
    T sum = 0;
    for (int64_t t = 0; t < threads; ++t) sum += sums[t * w + j];
    y[j] = beta == T(0) ? alpha * sum : alpha * sum + beta * y[j];
  }
}

// y = alpha · A x + beta · y with A's w rows (and y) split over threads.
template <typename T>
void mat_vec_split(int64_t w, int64_t k, T alpha, const T* A, int64_t lda, const T* x, T beta,
                   T* y) {
  if (!split(w, k, sizeof(T))) return mat_vec(w, k, alpha, A, lda, x, beta, y);
  at::parallel_for(0, w, grain(w), [&](int64_t begin, int64_t end) {
    mat_vec(end - begin, k, alpha, A + begin * lda, lda, x, beta, y + begin);
  });
}

// C = alpha · a bᵀ + beta · C with C's m rows split over threads.
template <typename T>
void outer_split(int64_t m, int64_t n, T alpha, const T* a, int64_t inc_a, const T* b, T beta,
                 T* C, int64_t ldc) {
  if (!split(m, n, sizeof(T))) return outer(m, n, alpha, a, inc_a, b, beta, C, ldc);
  at::parallel_for(0, m, grain(m), [&](int64_t begin, int64_t end) {
    outer(end - begin, n, alpha, a + begin * inc_a, inc_a, b, beta, C + begin * ldc, ldc);
  });
}

// Single-row, single-column and k = 1 products through cpu/gemv.h, where the vectors are
// contiguous (always so in the kernels' one-row passes): faster than MKL's gemv and gemm at these
// shapes on the 2-core EPYC (bench/RESULTS.md, 2026-12-01). BLAS gemv stays for the rest.
template <typename T>
bool try_own_gemv(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A,
                  int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 1) {  // c (n) = a op(B), a = row 0 of op(A)
    if (op_a == Op::T && lda != 1) return false;
    if (op_b == Op::N) {
      vec_mat_split(k, n, alpha, A, B, ldb, beta, C);
    } else {
      mat_vec_split(n, k, alpha, B, ldb, A, beta, C);
    }
    return true;
  }
  if (n == 1) {  // c (m) = op(A) b, b = column 0 of op(B)
    if (ldc != 1 || (op_b == Op::N && ldb != 1)) return false;
    if (op_a == Op::N) {
      mat_vec_split(m, k, alpha, A, lda, B, beta, C);
    } else {
      vec_mat_split(k, m, alpha, B, A, lda, beta, C);
    }
    return true;
  }
  if (k == 1 && (op_b == Op::N || ldb == 1)) {  // C = a bᵀ: column 0 of op(A), row 0 of op(B)
    outer_split(m, n, alpha, A, op_a == Op::N ? lda : 1, B, beta, C, ldc);
    return true;
  }
  return false;
}

bool fits_int(int64_t v) { return v <= INT_MAX; }

// The same product through ATen, on views of the caller's memory.
template <typename T>
void gemm_aten(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A,
               int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, Op op, int64_t rows, int64_t cols, int64_t ld) {
    T* data = const_cast<T*>(p);  // read only: addmm_out does not write its inputs
    return op == Op::N ? at::from_blob(data, {rows, cols}, {ld, 1}, opts)
                       : at::from_blob(data, {cols, rows}, {ld, 1}, opts).t();
  };
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  at::addmm_out(c, c, view(A, op_a, m, k, lda), view(B, op_b, k, n, ldb), beta, alpha);
}

}  // namespace

template <typename T>
void gemm(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = beta · C (BLAS would also accept it; this avoids ld = 0)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const FortranGemm<T> blas = fortran_gemm<T>();
  if (blas == nullptr || !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) ||
      !fits_int(ldb) || !fits_int(ldc)) {
    gemm_aten(op_a, op_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (try_own_gemv(op_a, op_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  if (try_gemv(op_a, op_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)) return;
  // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: swap the operands, keep the
  // transpose flags (a row-major matrix read column-major is its own transpose).
  const char ta = op_b == Op::T ? 'T' : 'N', tb = op_a == Op::T ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  blas(&ta, &tb, &M, &N, &K, &alpha, B, &LDA, A, &LDB, &beta, C, &LDC);
}

template void gemm<float>(Op, Op, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<double>(Op, Op, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

const char* cpu_blas_name() {
  return fortran_gemm<float>() != nullptr && fortran_gemm<double>() != nullptr ? "blas" : "aten";
}

}  // namespace lowrank_ext::cpu
