// lowrank_ext::project_out — Y = X − Q(QᵀX), applied `passes` times (classical Gram–Schmidt;
// two passes, CGS2, keep Y orthogonal to span(Q) to working precision), columns optionally
// scaled to unit norm. Q: (n, k) with orthonormal columns (k may be 0), X: (n, p).
//
// Both backends run the same algorithm with every sum accumulated in float64 (inputs and
// outputs stay float32 or float64: no TF32, no half precision, whatever the matmul settings):
//   forward   C_j = Qᵀ Y_j, Y_{j+1} = Y_j − Q C_j for j < passes (Y_0 = X); then, if normalize,
//             Z = Y / ‖Y‖ column by column. C_j (float64) are saved for the backward.
//   backward  G_passes = dZ, or (dZ − Z diag(Zᵀ dZ)) / ‖Y‖ when normalized; then for j from
//             passes−1 down to 0: D_j = Qᵀ G_{j+1}, G_j = G_{j+1} − Q D_j. dX = G_0 and
//             dQ = −Σ_j (G_{j+1} C_jᵀ + Y_j D_jᵀ), with Y_j recomputed from X and the C_j.
// Shared by the CPU and CUDA backends: the checks and the kernel signatures.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

namespace lowrank_ext {

struct ProjectOutSizes {
  int64_t rows;     // n
  int64_t basis;    // k, columns of Q (0 allowed)
  int64_t columns;  // p, columns of X (0 allowed)
};

// With normalize, a column is refused when ‖y_j‖ ≤ kSpanTolerance · eps · ‖x_j‖: its residual is
// then rounding noise and normalizing it would return an arbitrary direction.
constexpr double kSpanTolerance = 4.0;

// Checks Q, X and passes; every failure is a c10::Error naming the argument.
ProjectOutSizes check_project_out_args(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                                       at::DeviceType backend);

// Checks the extra arguments of the backward (grad_Y, Y, coeffs, norms) against Q and X.
ProjectOutSizes check_project_out_backward_args(const at::Tensor& grad_Y, const at::Tensor& Q,
                                                const at::Tensor& X, const at::Tensor& Y,
                                                const at::Tensor& coeffs, const at::Tensor& norms,
                                                int64_t passes, bool normalize,
                                                at::DeviceType backend);

// Raises, naming the column, when a normalized column is (numerically) in span(Q) or not finite.
// x_sq and y_sq are the float64 squared column norms of X and of the unnormalized Y, on the CPU.
void check_normalizable(const double* x_sq, const double* y_sq, int64_t columns, double eps);

// Forward: returns (Y, coeffs, norms): Y (n, p) in X's dtype; coeffs (passes, k, p) float64, the
// C_j; norms (p,) float64, ‖Y‖ per column before normalization, or (0,) without normalize.
using ProjectOutResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
ProjectOutResult project_out_forward_cpu(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                                         bool normalize);
ProjectOutResult project_out_forward_cuda(const at::Tensor& Q, const at::Tensor& X,
                                          int64_t passes, bool normalize);

// Backward: output_mask selects (grad_Q, grad_X); an output not asked for is an empty (0,)
// tensor. Y is the forward's output (Z when normalized).
using ProjectOutGrads = std::tuple<at::Tensor, at::Tensor>;
ProjectOutGrads project_out_backward_cpu(const at::Tensor& grad_Y, const at::Tensor& Q,
                                         const at::Tensor& X, const at::Tensor& Y,
                                         const at::Tensor& coeffs, const at::Tensor& norms,
                                         int64_t passes, bool normalize,
                                         std::array<bool, 2> output_mask);
ProjectOutGrads project_out_backward_cuda(const at::Tensor& grad_Y, const at::Tensor& Q,
                                          const at::Tensor& X, const at::Tensor& Y,
                                          const at::Tensor& coeffs, const at::Tensor& norms,
                                          int64_t passes, bool normalize,
                                          std::array<bool, 2> output_mask);

}  // namespace lowrank_ext
