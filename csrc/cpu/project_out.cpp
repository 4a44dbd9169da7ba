// CPU kernels of lowrank_ext::project_out (float32, float64; every sum in float64).
//
// The rows are split into a fixed number of chunks (fixed by the sizes, not by the thread
// count, so results are bit-identical however many threads run) which at::parallel_for works
// through in parallel. One sweep over a chunk updates its rows (out = in − Q C) and, while those
// rows are still in cache, accumulates the chunk's partial Qᵀ out; the partials are then summed
// in chunk order. A forward with two passes therefore reads X, Q and Y three times in all.
// Plain loops rather than BLAS: BLAS may run float32 in reduced precision when the user allows
// it (TF32/bf16 matmul settings), which this op must never do.
#include "project_out.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/output_alloc.h"

namespace lowrank_ext {
namespace {

// One pass of the algorithm over row chunks of contiguous row-major matrices: Q (n, k) and
// operands A (n, p). C and the Gram results are (k, p) float64.
template <typename scalar_t>
class RowSweeper {
 public:
  RowSweeper(const scalar_t* Q, int64_t n, int64_t k, int64_t p) : Q_(Q), n_(n), k_(k), p_(p) {
    // At least 64 rows a chunk, at most 32 chunks, and the partials (chunks · k · p doubles)
    // held under 32 MiB unless k · p alone is larger.
    constexpr int64_t kMaxChunks = 32, kMinRows = 64, kPartialBudget = int64_t(1) << 22;
    const int64_t kp = std::max<int64_t>(k * p, 1);
    chunks_ = std::min({kMaxChunks, at::divup(n, kMinRows), std::max<int64_t>(1, kPartialBudget / kp)});
    chunks_ = std::max<int64_t>(chunks_, 1);
    chunk_rows_ = at::divup(std::max<int64_t>(n, 1), chunks_);
    // Below ~2^22 multiply-adds a sweep (a few ms on one core) run single-threaded: a call
    // makes up to six parallel regions, and on a loaded machine waking the pool for each cost
    // far more than the work (measured: 1 MMAC/sweep took 90 ms on 2 busy threads, 2 ms on 1).
    grain_ = n * std::max<int64_t>(k, 1) * std::max<int64_t>(p, 1) < (int64_t(1) << 22) ? chunks_ : 1;
  }

  // out = in − Q C row by row when out is given (in == out is allowed), then gram = Qᵀ out (or
  // Qᵀ in without out) when gram is given. Pointers of empty tensors may be null: with out or
  // gram null there is nothing to write, and C is only read when k · p > 0.
  void sweep(const scalar_t* in, const double* C, scalar_t* out, double* gram) const {
    const int64_t kp = k_ * p_;
    std::vector<double> partial(gram != nullptr ? chunks_ * kp : 0, 0.0);
    at::parallel_for(0, chunks_, grain_, [&](int64_t c0, int64_t c1) {
      std::vector<double> row(p_);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * chunk_rows_, i1 = std::min(n_, i0 + chunk_rows_);
        const scalar_t* operand = in;
        if (out != nullptr) {
          subtract_rows(in, C, out, i0, i1, row.data());
          operand = out;
        }
        if (gram != nullptr) gram_rows(operand, i0, i1, partial.data() + c * kp);
      }
    });
    if (gram != nullptr) sum_chunks(partial, kp, gram);
  }

  // Σ_i A[i, c] B[i, c] for every column c.
  std::vector<double> column_dots(const scalar_t* A, const scalar_t* B) const {
    std::vector<double> partial(chunks_ * p_, 0.0), dots(p_);
    at::parallel_for(0, chunks_, grain_, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double* __restrict__ acc = partial.data() + c * p_;
        const int64_t i0 = c * chunk_rows_, i1 = std::min(n_, i0 + chunk_rows_);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = 0; j < p_; ++j) {
            acc[j] += static_cast<double>(A[i * p_ + j]) * static_cast<double>(B[i * p_ + j]);
          }
        }
      }
    });
    sum_chunks(partial, p_, dots.data());
    return dots;
  }

  // out[i, c] = (G[i, c] − Z[i, c] · s[c]) / norm[c]; Z may be null (then just G / norm).
  void scale_columns(const scalar_t* G, const scalar_t* Z, const double* s, const double* norm,
                     scalar_t* out) const {
    at::parallel_for(0, n_, row_grain(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = 0; j < p_; ++j) {
          const int64_t e = i * p_ + j;
          const double z = Z != nullptr ? static_cast<double>(Z[e]) * s[j] : 0.0;
          out[e] = static_cast<scalar_t>((static_cast<double>(G[e]) - z) / norm[j]);
        }
      }
    });
  }

  // Rows per at::parallel_for task of the row-independent loops.
  int64_t row_grain() const { return grain_ == 1 ? chunk_rows_ : std::max<int64_t>(n_, 1); }

 private:
  void subtract_rows(const scalar_t* in, const double* __restrict__ C, scalar_t* out, int64_t i0,
                     int64_t i1, double* __restrict__ row) const {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* __restrict__ q = Q_ + i * k_;
      if (p_ == 1) {
        row[0] = dot(q, C);
      } else {
        std::fill(row, row + p_, 0.0);
        for (int64_t kk = 0; kk < k_; ++kk) {
          const double qv = static_cast<double>(q[kk]);
          const double* __restrict__ c_row = C + kk * p_;
          for (int64_t j = 0; j < p_; ++j) row[j] += qv * c_row[j];
        }
      }
      // Read in[i, ·] in full before writing out[i, ·]: in and out may be the same matrix.
      for (int64_t j = 0; j < p_; ++j) {
        out[i * p_ + j] = static_cast<scalar_t>(static_cast<double>(in[i * p_ + j]) - row[j]);
      }
    }
  }

  // Σ_kk q[kk] c[kk] with eight independent partial sums (a fixed order, and no serial chain
  // of dependent additions through the whole row).
  double dot(const scalar_t* __restrict__ q, const double* __restrict__ c) const {
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t kk = 0;
    for (; kk + 8 <= k_; kk += 8) {
      for (int u = 0; u < 8; ++u) part[u] += static_cast<double>(q[kk + u]) * c[kk + u];
    }
    for (; kk < k_; ++kk) part[0] += static_cast<double>(q[kk]) * c[kk];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }

  void gram_rows(const scalar_t* A, int64_t i0, int64_t i1, double* __restrict__ acc) const {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* __restrict__ q = Q_ + i * k_;
      const scalar_t* __restrict__ a = A + i * p_;
      if (p_ == 1) {  // the common case (one new vector): a contiguous axpy over k
        const double a0 = static_cast<double>(a[0]);
        for (int64_t kk = 0; kk < k_; ++kk) acc[kk] += static_cast<double>(q[kk]) * a0;
        continue;
      }
      for (int64_t kk = 0; kk < k_; ++kk) {
        const double qv = static_cast<double>(q[kk]);
        double* acc_row = acc + kk * p_;
        for (int64_t j = 0; j < p_; ++j) acc_row[j] += qv * static_cast<double>(a[j]);
      }
    }
  }

  void sum_chunks(const std::vector<double>& partial, int64_t size, double* out) const {
    std::fill(out, out + size, 0.0);
    for (int64_t c = 0; c < chunks_; ++c) {
      const double* part = partial.data() + c * size;
      for (int64_t e = 0; e < size; ++e) out[e] += part[e];
    }
  }

  const scalar_t* Q_;
  int64_t n_, k_, p_;
  int64_t chunks_ = 1, chunk_rows_ = 1, grain_ = 1;
};

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

ProjectOutResult project_out_forward_cpu(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                                         bool normalize) {
  const ProjectOutSizes sz = check_project_out_args(Q, X, passes, normalize, at::kCPU);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen calls below are internal
  const int64_t n = sz.rows, k = sz.basis, p = sz.columns;
  const at::Tensor Qc = Q.contiguous(), Xc = X.contiguous();
  const auto f64 = X.options().dtype(at::kDouble);
  at::Tensor Y = cpu::empty_output({n, p}, X.options());
  at::Tensor coeffs = at::empty({passes, k, p}, f64);
  at::Tensor norms = at::empty({normalize ? p : 0}, f64);

  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "lowrank_ext_project_out_forward_cpu", [&] {
    const RowSweeper<scalar_t> rows(Qc.const_data_ptr<scalar_t>(), n, k, p);
    const scalar_t* x = Xc.const_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    double* C = coeffs.mutable_data_ptr<double>();
    rows.sweep(x, nullptr, nullptr, C);  // C_0 = Qᵀ X
    for (int64_t j = 0; j < passes; ++j) {
      // Y_{j+1} = Y_j − Q C_j, and C_{j+1} = Qᵀ Y_{j+1} from the same sweep.
      const bool last = j + 1 == passes;
      rows.sweep(j == 0 ? x : y, C + j * k * p, y, last ? nullptr : C + (j + 1) * k * p);
    }
    if (normalize) {
      const std::vector<double> x_sq = rows.column_dots(x, x), y_sq = rows.column_dots(y, y);
      check_normalizable(x_sq.data(), y_sq.data(), p, k, std::numeric_limits<scalar_t>::epsilon());
      double* norm = norms.mutable_data_ptr<double>();
      for (int64_t j = 0; j < p; ++j) norm[j] = std::sqrt(y_sq[j]);
      rows.scale_columns(y, nullptr, nullptr, norm, y);
    }
  });
  return {Y, coeffs, norms};
}

ProjectOutGrads project_out_backward_cpu(const at::Tensor& grad_Y, const at::Tensor& Q,
                                         const at::Tensor& X, const at::Tensor& Y,
                                         const at::Tensor& coeffs, const at::Tensor& norms,
                                         int64_t passes, bool normalize,
                                         const c10::List<bool>& output_mask) {
  const auto [need_dQ, need_dX] = project_out_output_mask(output_mask);
  const ProjectOutSizes sz = check_project_out_backward_args(grad_Y, Q, X, Y, coeffs, norms,
                                                             passes, normalize, at::kCPU);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = sz.rows, k = sz.basis, p = sz.columns, np = n * p, kp = k * p;
  at::Tensor dQ = need_dQ ? at::empty({n, k}, Q.options()) : empty_grad(Q);
  at::Tensor dX = need_dX ? cpu::empty_output({n, p}, X.options()) : empty_grad(X);
  if (!need_dQ && !need_dX) return {dQ, dX};

  const at::Tensor Gc = grad_Y.contiguous(), Qc = Q.contiguous(), Xc = X.contiguous();
  const at::Tensor Zc = Y.contiguous(), Cc = coeffs.contiguous();
  const auto f64 = X.options().dtype(at::kDouble);
  // G_1 … G_passes (G_0 is dX), and D_j = Qᵀ G_{j+1}.
  at::Tensor G_upper = at::empty({passes, n, p}, X.options());
  at::Tensor D = at::empty({passes, k, p}, f64);

  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "lowrank_ext_project_out_backward_cpu", [&] {
    const RowSweeper<scalar_t> rows(Qc.const_data_ptr<scalar_t>(), n, k, p);
    const double* C = Cc.const_data_ptr<double>();
    double* Dp = D.mutable_data_ptr<double>();
    scalar_t* upper = G_upper.mutable_data_ptr<scalar_t>();
    auto G = [&](int64_t j) { return j == 0 ? dX.mutable_data_ptr<scalar_t>() : upper + (j - 1) * np; };

    // G_passes: through the normalization first when there was one.
    const scalar_t* g = Gc.const_data_ptr<scalar_t>();
    if (normalize) {
      const scalar_t* z = Zc.const_data_ptr<scalar_t>();
      const std::vector<double> s = rows.column_dots(z, g);
      rows.scale_columns(g, z, s.data(), norms.const_data_ptr<double>(), G(passes));
    } else {
      std::copy(g, g + np, G(passes));
    }
    rows.sweep(G(passes), nullptr, nullptr, Dp + (passes - 1) * kp);  // D_{passes-1}
    // G_j = G_{j+1} − Q D_j, fused with D_{j-1} = Qᵀ G_j. G_0 = dX is only needed for dX.
    for (int64_t j = passes - 1; j >= (need_dX ? 0 : 1); --j) {
      rows.sweep(G(j + 1), Dp + j * kp, G(j), j > 0 ? Dp + (j - 1) * kp : nullptr);
    }
    if (!need_dQ) return;

    // Y_0 = X, Y_j = Y_{j-1} − Q C_{j-1}: recomputed exactly as the forward did.
    at::Tensor Y_inner = at::empty({std::max<int64_t>(passes - 1, 0), n, p}, X.options());
    std::vector<const scalar_t*> Yj(passes);
    Yj[0] = Xc.const_data_ptr<scalar_t>();
    for (int64_t j = 1; j < passes; ++j) {
      scalar_t* out = Y_inner.mutable_data_ptr<scalar_t>() + (j - 1) * np;
      rows.sweep(Yj[j - 1], C + (j - 1) * kp, out, nullptr);
      Yj[j] = out;
    }
    // dQ[i, :] = −Σ_j Σ_c (G_{j+1}[i, c] C_j[:, c] + Y_j[i, c] D_j[:, c]); rows independent.
    const at::Tensor CT = Cc.transpose(1, 2).contiguous(), DT = D.transpose(1, 2).contiguous();
    const double* ct = CT.const_data_ptr<double>();
    const double* dt = DT.const_data_ptr<double>();
    scalar_t* dq = dQ.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, rows.row_grain(), [&](int64_t i0, int64_t i1) {
      std::vector<double> acc(k);
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < passes; ++j) {
          for (int64_t c = 0; c < p; ++c) {
            const double gv = static_cast<double>(G(j + 1)[i * p + c]);
            const double yv = static_cast<double>(Yj[j][i * p + c]);
            const double* c_col = ct + (j * p + c) * k;
            const double* d_col = dt + (j * p + c) * k;
            for (int64_t kk = 0; kk < k; ++kk) acc[kk] += gv * c_col[kk] + yv * d_col[kk];
          }
        }
        for (int64_t kk = 0; kk < k; ++kk) dq[i * k + kk] = static_cast<scalar_t>(-acc[kk]);
      }
    });
  });
  return {dQ, dX};
}

at::Tensor project_out_cpu(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                           bool normalize) {
  return std::get<0>(project_out_forward_cpu(Q, X, passes, normalize));
}

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("project_out", TORCH_FN(project_out_cpu));
  m.impl("project_out_forward", TORCH_FN(project_out_forward_cpu));
  m.impl("project_out_backward", TORCH_FN(project_out_backward_cpu));
}

}  // namespace lowrank_ext
