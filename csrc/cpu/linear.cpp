// CPU kernels of lowrank_ext::linear (float32, float64).
//
// Both passes walk the batch in blocks of rows under at::parallel_for. A block of x
// (and of grad_y) is read from memory once and reused from cache by the small GEMMs that
// follow, and every result is written straight into its slice of the output, so no B×out or
// B×in temporary is ever allocated (on this class of machine the page faults of a fresh large
// buffer cost more than the arithmetic at small rank).
#include "linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

// Rows per block. At small r a block of 64 rows of x (1 MiB of fp32 at in = 4096) stays in L2
// between the GEMMs that read it. Blocks grow with r because BLAS runs short GEMMs poorly and,
// in the backward, every block re-reads and re-writes the (in + out)×r gradient accumulators:
// 2r/rows of a block's own traffic. Measured on a 2-core EPYC (bench/RESULTS.md).
int64_t forward_rows(int64_t rank) { return std::max<int64_t>(64, 4 * rank); }
int64_t backward_rows(int64_t rank) { return std::max<int64_t>(64, 8 * rank); }

// Grain of at::parallel_for: a whole block, but never so large that a thread is left idle.
int64_t grain(int64_t batch, int64_t block) {
  return std::max<int64_t>(1, std::min(block, at::divup(batch, at::get_num_threads())));
}

// The kernels call ATen ops on tensors that may require grad; autograd must not see them. The
// guard is thread-local, so each at::parallel_for worker sets its own.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// U S (diagonal or full): folding the core into U once costs O(out·r²), and then
// y = t (U S)ᵀ is a single GEMM per block. A full core applied to the batch instead,
// (t Sᵀ) Uᵀ, costs O(batch·r²): cheaper when the batch is smaller than out (OIALR's
// full-rank cores at training batch sizes).
bool folds_core(const at::Tensor& S, int64_t batch, int64_t out_features) {
  return S.dim() == 1 || batch >= out_features;
}

at::Tensor fold_core(const at::Tensor& U, const at::Tensor& S) {
  return S.dim() == 1 ? U * S : at::mm(U, S);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_forward_cpu(const at::Tensor& x, const at::Tensor& U,
                                                      const at::Tensor& S, const at::Tensor& V,
                                                      const std::optional<at::Tensor>& bias,
                                                      bool save_t) {
  const LinearSizes sz = check_linear_args(x, U, S, V, bias, at::kCPU);
  BelowAutograd below_autograd;
  const auto opts = x.options();
  at::Tensor y = at::empty(linear_output_shape(x, sz.out_features), opts);
  at::Tensor t = save_t ? at::empty({sz.batch, sz.rank}, opts) : at::empty({0}, opts);
  if (sz.batch == 0) return {y, t};

  const at::Tensor x2 = x.contiguous().view({sz.batch, sz.in_features});
  const at::Tensor y2 = y.view({sz.batch, sz.out_features});
  const bool fold = folds_core(S, sz.batch, sz.out_features);
  const at::Tensor US_T = fold ? fold_core(U, S).t() : U.t();
  const at::Tensor S_T = S.t();
  const int64_t block = forward_rows(sz.rank);
  const bool has_bias = bias.has_value() && bias->defined();

  at::parallel_for(0, sz.batch, grain(sz.batch, block), [&](int64_t begin, int64_t end) {
    BelowAutograd below_autograd_in_worker;
    at::Tensor scratch = save_t ? at::Tensor() : at::empty({block, sz.rank}, opts);
    at::Tensor core_scratch = fold ? at::Tensor() : at::empty({block, sz.rank}, opts);
    for (int64_t row = begin; row < end; row += block) {
      const int64_t rows = std::min(block, end - row);
      at::Tensor t_blk = save_t ? t.narrow(0, row, rows) : scratch.narrow(0, 0, rows);
      at::Tensor y_blk = y2.narrow(0, row, rows);
      at::mm_out(t_blk, x2.narrow(0, row, rows), V);
      at::Tensor mixed = t_blk;  // t Sᵀ when the core is not folded into U
      if (!fold) {
        mixed = core_scratch.narrow(0, 0, rows);
        at::mm_out(mixed, t_blk, S_T);
      }
      if (has_bias) {
        at::addmm_out(y_blk, *bias, mixed, US_T);
      } else {
        at::mm_out(y_blk, mixed, US_T);
      }
    }
  });
  return {y, t};
}

LinearGrads linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& t,
                                const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                std::array<bool, 5> output_mask) {
  const LinearSizes sz = check_linear_backward_args(grad_y, x, t, U, S, V, at::kCPU);
  BelowAutograd below_autograd;
  const auto [need_dx, need_dU, need_dS, need_dV, need_dbias] = output_mask;
  const bool need_t = need_dU || need_dS;
  const bool need_g = need_dS || need_dV || need_dx;  // g = grad_y U
  const bool need_dt = need_dV || need_dx;            // dt = g S, the gradient of t
  const bool need_x = need_dV || need_dx || (need_t && t.numel() == 0);
  const auto opts = x.options();
  const int64_t r = sz.rank;
  const int64_t block = backward_rows(r);

  at::Tensor dx = need_dx ? at::empty(x.sizes(), opts) : empty_grad(x);
  // One accumulator per thread for the reductions over the batch, summed at the end.
  const int64_t slots = at::get_num_threads();
  auto accumulator = [&](bool needed, at::IntArrayRef shape) {
    if (!needed) return at::Tensor();
    std::vector<int64_t> full{slots};
    full.insert(full.end(), shape.begin(), shape.end());
    return at::zeros(full, opts);
  };
  at::Tensor dU_acc = accumulator(need_dU, U.sizes());
  at::Tensor dS_acc = accumulator(need_dS, S.sizes());
  at::Tensor dV_acc = accumulator(need_dV, V.sizes());
  at::Tensor dbias_acc = accumulator(need_dbias, {sz.out_features});

  if (sz.batch > 0) {
    const at::Tensor dy2 = grad_y.contiguous().view({sz.batch, sz.out_features});
    const at::Tensor x2 = need_x ? x.contiguous().view({sz.batch, sz.in_features}) : at::Tensor();
    at::Tensor t2;
    if (need_t) t2 = t.numel() != 0 ? t.contiguous() : at::mm(x2, V);  // t not saved: recompute
    const at::Tensor dx2 = need_dx ? dx.view({sz.batch, sz.in_features}) : at::Tensor();
    const at::Tensor S_T = S.dim() == 2 ? S.t() : S;
    const at::Tensor ones = at::ones({block}, opts);

    at::parallel_for(0, sz.batch, grain(sz.batch, block), [&](int64_t begin, int64_t end) {
      BelowAutograd below_autograd_in_worker;
      const int64_t slot = at::get_thread_num();
      at::Tensor g = at::empty({block, r}, opts);
      at::Tensor work = at::empty({block, r}, opts);  // z = t Sᵀ, then g ⊙ t, then dt
      for (int64_t row = begin; row < end; row += block) {
        const int64_t rows = std::min(block, end - row);
        const at::Tensor dy_blk = dy2.narrow(0, row, rows);
        at::Tensor g_blk = g.narrow(0, 0, rows);
        at::Tensor work_blk = work.narrow(0, 0, rows);
        const at::Tensor t_blk = need_t ? t2.narrow(0, row, rows) : at::Tensor();
        if (need_dbias) {
          at::Tensor acc = dbias_acc[slot];
          at::addmv_out(acc, acc, dy_blk.t(), ones.narrow(0, 0, rows));
        }
        if (need_dU) {  // dU += dyᵀ z with z = t Sᵀ
          if (sz.diagonal_core) at::mul_out(work_blk, t_blk, S);
          else at::mm_out(work_blk, t_blk, S_T);
          at::Tensor acc = dU_acc[slot];
          at::addmm_out(acc, acc, dy_blk.t(), work_blk);
        }
        if (need_g) at::mm_out(g_blk, dy_blk, U);
        if (need_dS) {  // diagonal: dS += Σ_b g ⊙ t; full: dS += gᵀ t
          at::Tensor acc = dS_acc[slot];
          if (sz.diagonal_core) {
            at::mul_out(work_blk, g_blk, t_blk);
            at::addmv_out(acc, acc, work_blk.t(), ones.narrow(0, 0, rows));
          } else {
            at::addmm_out(acc, acc, g_blk.t(), t_blk);
          }
        }
        if (need_dt) {
          if (sz.diagonal_core) at::mul_out(work_blk, g_blk, S);
          else at::mm_out(work_blk, g_blk, S);
          if (need_dV) {
            at::Tensor acc = dV_acc[slot];
            at::addmm_out(acc, acc, x2.narrow(0, row, rows).t(), work_blk);
          }
          if (need_dx) {
            at::Tensor dx_blk = dx2.narrow(0, row, rows);
            at::mm_out(dx_blk, work_blk, V.t());
          }
        }
      }
    });
  }
  auto reduce = [&](const at::Tensor& acc, const at::Tensor& like) {
    return acc.defined() ? acc.sum(0) : empty_grad(like);
  };
  return {dx, reduce(dU_acc, U), reduce(dS_acc, S), reduce(dV_acc, V), reduce(dbias_acc, U)};
}

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("linear_forward", TORCH_FN(linear_forward_cpu));
  m.impl("linear_backward", TORCH_FN(linear_backward_cpu));
}

}  // namespace lowrank_ext
