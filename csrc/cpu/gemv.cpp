// See gemv.h.
#include "cpu/gemv.h"

#include <algorithm>
#include <cstdint>

// One copy of each loop per vector width, chosen by the CPU at load time (an ifunc), so a wheel
// built for baseline x86-64 still runs AVX2/AVX-512 code. Elsewhere: the compiler's default.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOWRANK_EXT_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LOWRANK_EXT_VECTOR_CLONES
#endif

// The 32-byte vector helpers below are always inlined, so no vector ever crosses a call: GCC's
// note that their ABI would differ without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lowrank_ext::cpu {
namespace {

template <typename T>
inline T scaled(T sum, T alpha, T beta, T old) {
  return beta == T(0) ? alpha * sum : alpha * sum + beta * old;
}

// 32-byte vectors (GCC vector extensions: each clone lowers them to its own instructions).
using F8 = float __attribute__((vector_size(32)));
using D4 = double __attribute__((vector_size(32)));
using I8 = int32_t __attribute__((vector_size(32)));
using L4 = int64_t __attribute__((vector_size(32)));

template <typename V>
[[gnu::always_inline]] inline V load(const void* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

// A two-vector shuffle with constant lane indices: clang and GCC 12+ spell it
// __builtin_shufflevector, older GCC __builtin_shuffle with a mask vector.
#if defined(__clang__) || __GNUC__ >= 12
#define LOWRANK_EXT_SHUFFLE(Mask, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define LOWRANK_EXT_SHUFFLE(Mask, a, b, ...) __builtin_shuffle(a, b, Mask{__VA_ARGS__})
#endif

// lanes[j] = Σ of vector a_j's lanes, for the 8 (float) or 4 (double) vectors of one tile: a
// transpose-and-add tree, so the horizontal sums cost a few shuffles per row, not a reduction each.
[[gnu::always_inline]] inline F8 lane_sums(const F8 (&a)[8]) {
  F8 p[4], q[2];
  for (int i = 0; i < 4; ++i) {
    const F8 x = a[2 * i], y = a[2 * i + 1];
    p[i] = LOWRANK_EXT_SHUFFLE(I8, x, y, 0, 8, 2, 10, 4, 12, 6, 14) +
           LOWRANK_EXT_SHUFFLE(I8, x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {
    const F8 x = p[2 * i], y = p[2 * i + 1];
    q[i] = LOWRANK_EXT_SHUFFLE(I8, x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
           LOWRANK_EXT_SHUFFLE(I8, x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return LOWRANK_EXT_SHUFFLE(I8, q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         LOWRANK_EXT_SHUFFLE(I8, q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

[[gnu::always_inline]] inline D4 lane_sums(const D4 (&a)[4]) {
  const D4 p0 = LOWRANK_EXT_SHUFFLE(L4, a[0], a[1], 0, 4, 2, 6) +
                LOWRANK_EXT_SHUFFLE(L4, a[0], a[1], 1, 5, 3, 7);
  const D4 p1 = LOWRANK_EXT_SHUFFLE(L4, a[2], a[3], 0, 4, 2, 6) +
                LOWRANK_EXT_SHUFFLE(L4, a[2], a[3], 1, 5, 3, 7);
  return LOWRANK_EXT_SHUFFLE(L4, p0, p1, 0, 1, 4, 5) + LOWRANK_EXT_SHUFFLE(L4, p0, p1, 2, 3, 6, 7);
}

// One panel of xᵀ A: NV whole vectors of columns plus `tail` (< one vector) more, summed in one
// walk over A's rows. The vector sums stay in registers with PH rows in flight (NV·PH independent
// sums, so no row's add waits on the previous row's).
template <typename T, typename V, int NV, int PH>
[[gnu::always_inline]] inline void vec_mat_panel(int64_t k, T alpha, const T* x, const T* A,
                                                 int64_t lda, int64_t tail, T beta, T* y) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  V acc[PH][NV] = {};
  T tail_acc[L] = {};
  int64_t i = 0;
  for (; i + PH <= k; i += PH) {
#pragma GCC unroll 8
    for (int p = 0; p < PH; ++p) {
      const V xi = V{} + x[i + p];
      const T* row = A + (i + p) * lda;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[p][v] += xi * load<V>(row + v * L);
      for (int64_t t = 0; t < tail; ++t) tail_acc[t] += x[i + p] * row[NV * L + t];
    }
  }
  for (; i < k; ++i) {
    const V xi = V{} + x[i];
    const T* row = A + i * lda;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] += xi * load<V>(row + v * L);
    for (int64_t t = 0; t < tail; ++t) tail_acc[t] += x[i] * row[NV * L + t];
  }
  for (int v = 0; v < NV; ++v) {
    V sum = acc[0][v];
    for (int p = 1; p < PH; ++p) sum += acc[p][v];
    for (int64_t l = 0; l < L; ++l) y[v * L + l] = scaled(sum[l], alpha, beta, y[v * L + l]);
  }
  for (int64_t t = 0; t < tail; ++t) y[NV * L + t] = scaled(tail_acc[t], alpha, beta, y[NV * L + t]);
}

// y = alpha · xᵀ A + beta · y in panels of up to 8 vectors of columns: one walk over A's rows
// per panel, so a rank-64 float32 factor is read once. Fewer than one vector of columns: summed
// in one scalar walk.
template <typename T, typename V>
[[gnu::always_inline]] inline void vec_mat_body(int64_t k, int64_t w, T alpha, const T* x,
                                                const T* A, int64_t lda, T beta, T* y) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  int64_t c0 = 0;
  while (w - c0 >= L) {
    const int64_t nv = std::min<int64_t>(8, (w - c0) / L);
    const int64_t rest = w - c0 - nv * L;
    const int64_t tail = rest < L ? rest : 0;  // the last panel takes the last few columns too
    const T* a = A + c0;
    T* yc = y + c0;
    switch (nv) {
      case 8: vec_mat_panel<T, V, 8, 1>(k, alpha, x, a, lda, tail, beta, yc); break;
      case 7: vec_mat_panel<T, V, 7, 1>(k, alpha, x, a, lda, tail, beta, yc); break;
      case 6: vec_mat_panel<T, V, 6, 1>(k, alpha, x, a, lda, tail, beta, yc); break;
      case 5: vec_mat_panel<T, V, 5, 1>(k, alpha, x, a, lda, tail, beta, yc); break;
      case 4: vec_mat_panel<T, V, 4, 2>(k, alpha, x, a, lda, tail, beta, yc); break;
      case 3: vec_mat_panel<T, V, 3, 2>(k, alpha, x, a, lda, tail, beta, yc); break;
      case 2: vec_mat_panel<T, V, 2, 4>(k, alpha, x, a, lda, tail, beta, yc); break;
      default: vec_mat_panel<T, V, 1, 4>(k, alpha, x, a, lda, tail, beta, yc); break;
    }
    c0 += nv * L + tail;
  }
  if (c0 < w) {
    T acc[L] = {};
    for (int64_t i = 0; i < k; ++i)
      for (int64_t t = 0; t < w - c0; ++t) acc[t] += x[i] * A[i * lda + c0 + t];
    for (int64_t t = 0; t < w - c0; ++t) y[c0 + t] = scaled(acc[t], alpha, beta, y[c0 + t]);
  }
}

// y = alpha · A x + beta · y: a dot product per row of A. Rows go in tiles of one vector's lanes
// (8 float, 4 double): each row's products are summed lane-wise, then the tile's lane sums come
// out of one tree as one vector of y. With a short row (a rank-16 factor: 2 vectors) a separate
// horizontal sum per row cost more than the row's arithmetic (bench/RESULTS.md, 2026-12-01).
template <typename T, typename V>
[[gnu::always_inline]] inline void mat_vec_body(int64_t w, int64_t k, T alpha, const T* A,
                                                int64_t lda, const T* x, T beta, T* y) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t k_vec = k - k % L;
  int64_t j = 0;
  for (; j + L <= w; j += L) {
    const T* a = A + j * lda;
    V acc[L] = {};
    for (int64_t c = 0; c < k_vec; c += L) {  // the tile's rows side by side: acc in registers
      const V xc = load<V>(x + c);
#pragma GCC unroll 8
      for (int64_t jj = 0; jj < L; ++jj) acc[jj] += load<V>(a + jj * lda + c) * xc;
    }
    T tail[L] = {};
    for (int64_t jj = 0; jj < L; ++jj)
      for (int64_t c = k_vec; c < k; ++c) tail[jj] += a[jj * lda + c] * x[c];
    const V sums = lane_sums(acc) + load<V>(tail);
    for (int64_t jj = 0; jj < L; ++jj) y[j + jj] = scaled(sums[jj], alpha, beta, y[j + jj]);
  }
  for (; j < w; ++j) {
    const T* a = A + j * lda;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < k; ++i) s += a[i] * x[i];
    y[j] = scaled(s, alpha, beta, y[j]);
  }
}

template <typename T>
[[gnu::always_inline]] inline void outer_body(int64_t m, int64_t n, T alpha, const T* a,
                                              int64_t inc_a, const T* b, T beta, T* C,
                                              int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    const T ai = alpha * a[i * inc_a];
    T* c = C + i * ldc;
    if (beta == T(0)) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) c[j] = ai * b[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) c[j] = ai * b[j] + beta * c[j];
    }
  }
}

LOWRANK_EXT_VECTOR_CLONES
void outer_f32(int64_t m, int64_t n, float alpha, const float* a, int64_t inc_a, const float* b,
               float beta, float* C, int64_t ldc) {
  outer_body(m, n, alpha, a, inc_a, b, beta, C, ldc);
}

LOWRANK_EXT_VECTOR_CLONES
void outer_f64(int64_t m, int64_t n, double alpha, const double* a, int64_t inc_a,
               const double* b, double beta, double* C, int64_t ldc) {
  outer_body(m, n, alpha, a, inc_a, b, beta, C, ldc);
}

LOWRANK_EXT_VECTOR_CLONES
void vec_mat_f32(int64_t k, int64_t w, float alpha, const float* x, const float* A, int64_t lda,
                 float beta, float* y) {
  vec_mat_body<float, F8>(k, w, alpha, x, A, lda, beta, y);
}

LOWRANK_EXT_VECTOR_CLONES
void vec_mat_f64(int64_t k, int64_t w, double alpha, const double* x, const double* A,
                 int64_t lda, double beta, double* y) {
  vec_mat_body<double, D4>(k, w, alpha, x, A, lda, beta, y);
}

LOWRANK_EXT_VECTOR_CLONES
void mat_vec_f32(int64_t w, int64_t k, float alpha, const float* A, int64_t lda, const float* x,
                 float beta, float* y) {
  mat_vec_body<float, F8>(w, k, alpha, A, lda, x, beta, y);
}

LOWRANK_EXT_VECTOR_CLONES
void mat_vec_f64(int64_t w, int64_t k, double alpha, const double* A, int64_t lda,
                 const double* x, double beta, double* y) {
  mat_vec_body<double, D4>(w, k, alpha, A, lda, x, beta, y);
}

}  // namespace

template <>
void vec_mat<float>(int64_t k, int64_t w, float alpha, const float* x, const float* A,
                    int64_t lda, float beta, float* y) {
  vec_mat_f32(k, w, alpha, x, A, lda, beta, y);
}
template <>
void vec_mat<double>(int64_t k, int64_t w, double alpha, const double* x, const double* A,
                     int64_t lda, double beta, double* y) {
  vec_mat_f64(k, w, alpha, x, A, lda, beta, y);
}
template <>
void mat_vec<float>(int64_t w, int64_t k, float alpha, const float* A, int64_t lda,
                    const float* x, float beta, float* y) {
  mat_vec_f32(w, k, alpha, A, lda, x, beta, y);
}
template <>
void mat_vec<double>(int64_t w, int64_t k, double alpha, const double* A, int64_t lda,
                     const double* x, double beta, double* y) {
  mat_vec_f64(w, k, alpha, A, lda, x, beta, y);
}

template <>
void outer<float>(int64_t m, int64_t n, float alpha, const float* a, int64_t inc_a,
                  const float* b, float beta, float* C, int64_t ldc) {
  outer_f32(m, n, alpha, a, inc_a, b, beta, C, ldc);
}
template <>
void outer<double>(int64_t m, int64_t n, double alpha, const double* a, int64_t inc_a,
                   const double* b, double beta, double* C, int64_t ldc) {
  outer_f64(m, n, alpha, a, inc_a, b, beta, C, ldc);
}

}  // namespace lowrank_ext::cpu
