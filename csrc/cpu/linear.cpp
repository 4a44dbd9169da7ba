// CPU kernels of lowrank_ext::linear (float32, float64).
//
// Both passes walk the batch in blocks of rows. A block of x (and of grad_y) is read from memory
// once and reused from cache by the small GEMMs that follow, and every result is written straight
// into its slice of the output, so no B×out or B×in temporary is ever allocated (on this class of
// machine the page faults of a fresh large buffer cost more than the arithmetic at small rank).
//
// The GEMMs are raw BLAS calls (cpu/blas.h): at inference batch sizes the per-call cost of ATen
// ops would exceed the arithmetic. With more than one block and more than one thread the blocks
// are spread over at::parallel_for (each BLAS call then runs on its worker's thread); a batch of
// one block runs on the calling thread, where the BLAS may use every thread itself.
#include "linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "cpu/blas.h"
#include "cpu/output_alloc.h"

namespace lowrank_ext {
namespace {

using cpu::gemm;
using cpu::Op;

// Rows per block. At small r a block of 64 rows of x (1 MiB of fp32 at in = 4096) stays in L2
// between the GEMMs that read it. Blocks grow with r because BLAS runs short GEMMs poorly and,
// in the backward, every block re-reads and re-writes the (in + out)×r gradient accumulators:
// 2r/rows of a block's own traffic. The backward's blocks stay at 2r rows: with 8r (the
// earlier choice) a block of dy and x at r = 64 was 8 MiB, read three times from beyond L2;
// on the 2-core EPYC 2r was as fast or faster at B = 4096 (bench/RESULTS.md, 2026-11-30).
int64_t forward_rows(int64_t rank) { return std::max<int64_t>(64, 4 * rank); }
int64_t backward_rows(int64_t rank) { return std::max<int64_t>(64, 2 * rank); }

// Whether threads split the batch (each then runs its own blocks with single-threaded BLAS)
// rather than the BLAS threading each call itself. The forward splits once every thread gets
// 32 rows; the backward only past one block, because each thread then needs its own zeroed
// (in + out)·r sums that are added up at the end. Measured with bench/run.py on the 2-core EPYC
// (bench/RESULTS.md): at B = 64 the split forward is faster, the split backward slower.
bool split_over_threads(int64_t batch, int64_t min_rows) {
  const int64_t threads = at::get_num_threads();
  return threads > 1 && batch >= min_rows && !at::in_parallel_region();
}

constexpr int64_t kForwardRowsPerThread = 32;

// Grain of at::parallel_for: a whole block, but never so large that a thread is left idle.
int64_t grain(int64_t batch, int64_t block) {
  return std::max<int64_t>(1, std::min(block, at::divup(batch, at::get_num_threads())));
}

// Work memory of one thread. Small buffers are kept per thread and reused: a fresh heap block
// on every call moves glibc's heap top, which then trims and re-faults the pages of the
// (much larger) gradient outputs on the next call.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t elements) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(elements, 1)) * sizeof(T);
    thread_local std::vector<std::max_align_t> kept;
    if (bytes <= kKeepBytes) {
      if (kept.size() * sizeof(std::max_align_t) < bytes) kept.resize(kKeepBytes / sizeof(std::max_align_t));
      data_ = reinterpret_cast<T*>(kept.data());
    } else {  // from the buffer cache: a fresh block here faulted in every call (large B, r)
      owned_ = cpu::empty_output({std::max<int64_t>(elements, 1)},
                                 at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
      data_ = owned_.mutable_data_ptr<T>();
    }
  }
  T* get() const { return data_; }

 private:
  static constexpr size_t kKeepBytes = size_t{1} << 20;
  at::Tensor owned_;
  T* data_ = nullptr;
};

// A factor read where it lies: row-major with row stride ld, or, when `transposed`, the transpose
// of a row-major matrix (a column-major tensor, as torch.linalg.qr/svd return and .t() makes).
// BLAS takes either through its transpose flags, so such factors are not copied on every call.
template <typename T>
struct Mat {
  const T* p;
  int64_t ld;
  bool transposed;
  // The BLAS flag that applies `op` to this matrix.
  Op as(Op op) const { return transposed == (op == Op::T) ? Op::N : Op::T; }
};

// `keep` holds the memory Mat points to (t itself, or a contiguous copy for other strides).
template <typename T>
Mat<T> as_mat(const at::Tensor& t, at::Tensor& keep) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(cols, 1)) {
    keep = t;
    return {keep.const_data_ptr<T>(), t.stride(0), false};
  }
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(rows, 1)) {
    keep = t;
    return {keep.const_data_ptr<T>(), t.stride(1), true};
  }
  keep = t.contiguous();
  return {keep.const_data_ptr<T>(), std::max<int64_t>(cols, 1), false};
}

// S as a Mat: a full core where it lies, a diagonal as a contiguous vector in .p.
template <typename T>
Mat<T> factor_core(const at::Tensor& S, at::Tensor& keep) {
  if (S.dim() == 2) return as_mat<T>(S, keep);
  keep = S.contiguous();
  return {keep.const_data_ptr<T>(), 1, false};
}

// C (rows × n, row stride ldc) = A (rows × k) · op(B) + beta · C, where op(B) = B.as(op) is k × n,
// with B's n columns split over torch's threads when the batch is small and B is large: MKL
// threads a GEMM of a few rows poorly (at 16 rows, 4096 → 4096, r = 64: 147 µs on one thread,
// 110 µs on two), and each thread here then streams its own part of the factor.
template <typename T>
void gemm_split_cols(int64_t rows, int64_t n, int64_t k, const T* A, int64_t lda, const Mat<T>& B,
                     Op op, T beta, T* C, int64_t ldc) {
  const Op flag = B.as(op);
  auto part = [&](int64_t begin, int64_t end) {
    const T* b = B.p + (flag == Op::N ? begin : begin * B.ld);
    gemm<T>(Op::N, flag, rows, end - begin, k, 1, A, lda, b, B.ld, beta, C + begin, ldc);
  };
  const int64_t threads = at::get_num_threads();
  const bool split = threads > 1 && !at::in_parallel_region() && n >= 64 * threads &&
                     k * n * static_cast<int64_t>(sizeof(T)) >= cpu::kThreadSplitBytes;
  if (!split) return part(0, n);
  const int64_t cols = at::divup(at::divup(n, threads), 16) * 16;  // whole cache lines each
  at::parallel_for(0, n, cols, [&](int64_t begin, int64_t end) { part(begin, end); });
}

// How the core meets the batch in the forward.
//   kScale: diagonal S scales t (B·r multiplies; never folded into U, which would cost out·r
//           and an allocation on every call).
//   kCoreOnBatch: full S applied to the batch, z = t Sᵀ (B·r², cheaper while B < out).
//   kFolded: full S folded into U once, y = t (U S)ᵀ (out·r², cheaper once B ≥ out).
enum class Core { kScale, kCoreOnBatch, kFolded };

template <typename T>
struct Forward {
  const T* x;     // (B, n)
  Mat<T> V;       // (n, r)
  Mat<T> S;       // (r, r) core, or (r) contiguous diagonal in S.p
  Mat<T> M;       // (m, r): U, or U S when folded
  const T* bias;  // (m) or null
  T* y;           // (B, m)
  T* t;           // (B, r) when t is saved, else null
  int64_t n, m, r;
  Core core;

  // Rows [row, row + rows); work holds 2·rows·r elements.
  void block(int64_t row, int64_t rows, T* work) const {
    T* tb = t != nullptr ? t + row * r : work;
    gemm_split_cols<T>(rows, r, n, x + row * n, n, V, Op::N, T(0), tb, r);
    const T* z = tb;
    if (core == Core::kScale) {
      T* zb = t != nullptr ? work : tb;  // the saved t stays unscaled
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < r; ++c) zb[i * r + c] = tb[i * r + c] * S.p[c];
      z = zb;
    } else if (core == Core::kCoreOnBatch) {
      T* zb = work + rows * r;
      gemm<T>(Op::N, S.as(Op::T), rows, r, r, 1, tb, r, S.p, S.ld, 0, zb, r);
      z = zb;
    }
    T* yb = y + row * m;
    T beta = 0;
    if (bias != nullptr) {
      for (int64_t i = 0; i < rows; ++i) std::copy(bias, bias + m, yb + i * m);
      beta = 1;
    }
    gemm_split_cols<T>(rows, m, r, z, r, M, Op::T, beta, yb, m);
  }
};

// The batch sums of one thread (or the outputs themselves on a single pass).
template <typename T>
struct Sums {
  T* dU = nullptr;  // (m, r), or stored as its transpose (r, m): see Backward::tU
  T* dS = nullptr;  // (r) or (r, r), or (r, r) transposed
  T* dV = nullptr;  // (n, r), or (r, n)
  T* db = nullptr;  // (m)
  bool first = true;  // the first block overwrites (beta = 0), later blocks add
};

template <typename T>
struct Backward {
  const T* dy;  // (B, m)
  const T* x;   // (B, n), or null when neither dV nor a recomputed t needs it
  const T* t;   // (B, r) saved, or null: recomputed from x when dU or dS needs it
  Mat<T> U;
  Mat<T> S;  // as in Forward
  Mat<T> V;
  T* dx;  // (B, n) or null
  int64_t n, m, r;
  bool diag, need_dx, need_dU, need_dS, need_dV, need_db;
  bool tU, tS, tV;  // write that gradient transposed (column-major, grad_transposed)

  // Rows [row, row + rows); work holds 3·rows·r + rows elements.
  void block(int64_t row, int64_t rows, T* work, Sums<T>& sums) const {
    const T beta = sums.first ? T(0) : T(1);
    sums.first = false;
    T* buf_t = work;
    T* buf_g = work + rows * r;
    T* buf_z = work + 2 * rows * r;  // z = t Sᵀ, later dt = g S
    T* ones = work + 3 * rows * r;
    const T* dyb = dy + row * m;
    const T* xb = x != nullptr ? x + row * n : nullptr;
    const T* tb = nullptr;
    if (need_dU || need_dS) {
      if (t != nullptr) {
        tb = t + row * r;
      } else {
        gemm<T>(Op::N, V.as(Op::N), rows, r, n, 1, xb, n, V.p, V.ld, 0, buf_t, r);
        tb = buf_t;
      }
    }
    if (need_db) {  // db += 1ᵀ dy
      std::fill(ones, ones + rows, T(1));
      gemm<T>(Op::N, Op::N, 1, m, rows, 1, ones, rows, dyb, m, beta, sums.db, m);
    }
    if (need_dU) {  // dU += dyᵀ z, z = t Sᵀ
      if (diag) {
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < r; ++c) buf_z[i * r + c] = tb[i * r + c] * S.p[c];
      } else {
        gemm<T>(Op::N, S.as(Op::T), rows, r, r, 1, tb, r, S.p, S.ld, 0, buf_z, r);
      }
      if (tU) {  // dUᵀ += zᵀ dy
        gemm<T>(Op::T, Op::N, r, m, rows, 1, buf_z, r, dyb, m, beta, sums.dU, m);
      } else {
        gemm<T>(Op::T, Op::N, m, r, rows, 1, dyb, m, buf_z, r, beta, sums.dU, r);
      }
    }
    if (!(need_dS || need_dV || need_dx)) return;
    gemm<T>(Op::N, U.as(Op::N), rows, r, m, 1, dyb, m, U.p, U.ld, 0, buf_g, r);  // g = dy U
    if (need_dS) {  // diagonal: dS += Σ_b g ⊙ t; full: dS += gᵀ t
      if (diag) {
        for (int64_t c = 0; c < r; ++c) {
          T s = 0;
          for (int64_t i = 0; i < rows; ++i) s += buf_g[i * r + c] * tb[i * r + c];
          sums.dS[c] = beta == T(0) ? s : sums.dS[c] + s;  // never 0·NaN
        }
      } else if (tS) {  // dSᵀ += tᵀ g
        gemm<T>(Op::T, Op::N, r, r, rows, 1, tb, r, buf_g, r, beta, sums.dS, r);
      } else {
        gemm<T>(Op::T, Op::N, r, r, rows, 1, buf_g, r, tb, r, beta, sums.dS, r);
      }
    }
    if (!(need_dV || need_dx)) return;
    T* dt = buf_z;  // dt = g S, the gradient of t
    if (diag) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < r; ++c) dt[i * r + c] = buf_g[i * r + c] * S.p[c];
    } else {
      gemm<T>(Op::N, S.as(Op::N), rows, r, r, 1, buf_g, r, S.p, S.ld, 0, dt, r);
    }
    if (need_dV && tV) {  // dVᵀ += dtᵀ x
      gemm<T>(Op::T, Op::N, r, n, rows, 1, dt, r, xb, n, beta, sums.dV, n);
    } else if (need_dV) {
      gemm<T>(Op::T, Op::N, n, r, rows, 1, xb, n, dt, r, beta, sums.dV, r);
    }
    if (need_dx) gemm<T>(Op::N, V.as(Op::T), rows, n, r, 1, dt, r, V.p, V.ld, 0, dx + row * n, n);
  }
};

// Runs body(row, rows, work) over the batch in blocks: on the calling thread, or, from
// min_split_rows rows on, spread over threads with one scratch per worker sized by the rows it
// actually gets (never by r alone).
template <typename T, typename Body>
void over_blocks(int64_t batch, int64_t block, int64_t work_per_row, int64_t min_split_rows,
                 Body&& body) {
  auto run = [&](int64_t begin, int64_t end) {
    const int64_t rows_max = std::min(block, end - begin);
    const Scratch<T> work(rows_max * work_per_row);
    for (int64_t row = begin; row < end; row += block) {
      body(row, std::min(block, end - row), work.get());
    }
  };
  if (!split_over_threads(batch, min_split_rows)) {
    run(0, batch);
  } else {
    at::parallel_for(0, batch, grain(batch, block), [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd_in_worker;
      run(begin, end);
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_forward_cpu(const at::Tensor& x, const at::Tensor& U,
                                                      const at::Tensor& S, const at::Tensor& V,
                                                      const std::optional<at::Tensor>& bias,
                                                      bool save_t) {
  const LinearSizes sz = check_linear_args(x, U, S, V, bias, at::kCPU);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal ATen calls
  const auto opts = x.options();
  at::Tensor y = cpu::empty_output(linear_output_shape(x, sz.out_features), opts);
  at::Tensor t = save_t ? cpu::empty_output({sz.batch, sz.rank}, opts) : at::empty({0}, opts);
  if (sz.batch == 0) return {y, t};

  const Core core = sz.diagonal_core                  ? Core::kScale
                    : sz.batch >= sz.out_features ? Core::kFolded
                                                      : Core::kCoreOnBatch;
  const at::Tensor xc = x.contiguous();
  const at::Tensor M = core == Core::kFolded ? at::mm(U, S) : U;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lowrank_ext_linear_forward_cpu", [&] {
    at::Tensor keep_V, keep_S, keep_M;
    const Forward<scalar_t> f{xc.const_data_ptr<scalar_t>(),
                              as_mat<scalar_t>(V, keep_V),
                              factor_core<scalar_t>(S, keep_S),
                              as_mat<scalar_t>(M, keep_M),
                              has_bias ? bc.const_data_ptr<scalar_t>() : nullptr,
                              y.mutable_data_ptr<scalar_t>(),
                              save_t ? t.mutable_data_ptr<scalar_t>() : nullptr,
                              sz.in_features,
                              sz.out_features,
                              sz.rank,
                              core};
    over_blocks<scalar_t>(sz.batch, forward_rows(sz.rank), 2 * sz.rank,
                          kForwardRowsPerThread * at::get_num_threads(),
                          [&](int64_t row, int64_t rows, scalar_t* work) {
                            f.block(row, rows, work);
                          });
  });
  return {y, t};
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                      const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  return std::get<0>(linear_forward_cpu(x, U, S, V, bias, /*save_t=*/false));
}

LinearGrads linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& t,
                                const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                const c10::List<bool>& output_mask) {
  const auto [need_dx, need_dU, need_dS, need_dV, need_db] = linear_output_mask(output_mask);
  const LinearSizes sz = check_linear_backward_args(grad_y, x, t, U, S, V, at::kCPU);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool recompute_t = (need_dU || need_dS) && t.numel() == 0;
  const bool need_x = need_dV || recompute_t;
  const auto opts = x.options();
  const int64_t B = sz.batch, n = sz.in_features, m = sz.out_features, r = sz.rank;

  at::Tensor dx = need_dx ? cpu::empty_output(x.sizes(), opts) : at::empty({0}, opts);
  const bool tU = grad_transposed(U), tS = grad_transposed(S), tV = grad_transposed(V);
  // A gradient as the kernel writes it: row-major, or, for a factor whose gradient is
  // column-major, its transpose row-major (returned below as the transposed view).
  auto stored = [&](bool needed, at::IntArrayRef shape, bool transposed) {
    if (!needed) return at::empty({0}, opts);
    std::vector<int64_t> s(shape.begin(), shape.end());
    if (transposed) std::swap(s[0], s[1]);
    return B == 0 ? at::zeros(s, opts) : cpu::empty_output(s, opts);  // empty batch: zero
  };
  at::Tensor sU = stored(need_dU, U.sizes(), tU), sS = stored(need_dS, S.sizes(), tS);
  at::Tensor sV = stored(need_dV, V.sizes(), tV), db = stored(need_db, {m}, false);
  const at::Tensor dU = tU && need_dU ? sU.t() : sU, dS = tS && need_dS ? sS.t() : sS;
  const at::Tensor dV = tV && need_dV ? sV.t() : sV;
  if (B == 0) return {dx, dU, dS, dV, db};

  const at::Tensor dyc = grad_y.contiguous();
  const at::Tensor xc = need_x ? x.contiguous() : at::Tensor();
  const at::Tensor tc = (need_dU || need_dS) && !recompute_t ? t.contiguous() : at::Tensor();
  const int64_t block = backward_rows(r);
  const bool split = split_over_threads(B, block + 1);
  // Split over threads: one zeroed set of sums per thread, added up at the end.
  const int64_t slots = split ? at::get_num_threads() : 1;
  auto partial = [&](bool needed, const at::Tensor& out) {
    if (!needed || !split) return out;
    std::vector<int64_t> shape{slots};
    shape.insert(shape.end(), out.sizes().begin(), out.sizes().end());
    return cpu::empty_output(shape, opts).zero_();
  };
  const at::Tensor pU = partial(need_dU, sU), pS = partial(need_dS, sS);
  const at::Tensor pV = partial(need_dV, sV), pb = partial(need_db, db);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lowrank_ext_linear_backward_cpu", [&] {
    using T = scalar_t;
    at::Tensor keep_U, keep_S, keep_V;
    const Backward<T> b{dyc.const_data_ptr<T>(),
                        need_x ? xc.const_data_ptr<T>() : nullptr,
                        tc.defined() ? tc.const_data_ptr<T>() : nullptr,
                        as_mat<T>(U, keep_U),
                        factor_core<T>(S, keep_S),
                        as_mat<T>(V, keep_V),
                        need_dx ? dx.mutable_data_ptr<T>() : nullptr,
                        n,
                        m,
                        r,
                        sz.diagonal_core,
                        need_dx,
                        need_dU,
                        need_dS,
                        need_dV,
                        need_db,
                        tU,
                        tS,
                        tV};
    auto slot_sums = [&](int64_t slot) {
      Sums<T> s;
      auto at_slot = [&](bool needed, const at::Tensor& p, int64_t size) -> T* {
        return needed ? p.mutable_data_ptr<T>() + slot * size : nullptr;
      };
      s.dU = at_slot(need_dU, pU, m * r);
      s.dS = at_slot(need_dS, pS, S.numel());
      s.dV = at_slot(need_dV, pV, n * r);
      s.db = at_slot(need_db, pb, m);
      s.first = !split;  // thread partials start at zero and are always added to
      return s;
    };
    if (!split) {
      Sums<T> sums = slot_sums(0);
      over_blocks<T>(B, block, 3 * r + 1, /*min_split_rows=*/B + 1,
                     [&](int64_t row, int64_t rows, T* work) {
        b.block(row, rows, work, sums);
      });
    } else {
      at::parallel_for(0, B, grain(B, block), [&](int64_t begin, int64_t end) {
        at::AutoDispatchBelowADInplaceOrView below_autograd_in_worker;
        Sums<T> sums = slot_sums(at::get_thread_num());
        const Scratch<T> work(std::min(block, end - begin) * (3 * r + 1));
        for (int64_t row = begin; row < end; row += block) {
          b.block(row, std::min(block, end - row), work.get(), sums);
        }
      });
    }
  });
  if (split) {
    if (need_dU) at::sum_out(sU, pU, 0);
    if (need_dS) at::sum_out(sS, pS, 0);
    if (need_dV) at::sum_out(sV, pV, 0);
    if (need_db) at::sum_out(db, pb, 0);
  }
  return {dx, dU, dS, dV, db};
}

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("linear", TORCH_FN(linear_cpu));
  m.impl("linear_forward", TORCH_FN(linear_forward_cpu));
  m.impl("linear_backward", TORCH_FN(linear_backward_cpu));
}

}  // namespace lowrank_ext
