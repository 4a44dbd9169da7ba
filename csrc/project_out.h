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

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>

namespace lowrank_ext {

struct ProjectOutSizes {
  int64_t rows;     // n
  int64_t basis;    // k, columns of Q (0 allowed)
  int64_t columns;  // p, columns of X (0 allowed)
};

// The most passes a call may ask for. Two passes (CGS2) already leave Y orthogonal to span(Q) to
// working precision ("twice is enough"); each further pass only multiplies what is left in
// span(Q) by ‖QᵀQ − I‖ again, which helps a Q that is itself orthonormal to less than working
// precision. The bound keeps the work (passes · n·k·p) and the memory (coeffs: passes·k·p
// doubles; backward: passes·n·p) proportional to the input, whatever number a caller passes.
constexpr int64_t kMaxPasses = 8;

// normalize=True needs at least this many passes. After one pass, the residual of a column in
// span(Q) is Q(I − QᵀQ)a plus rounding: Q's own non-orthogonality, which grows with Q's size and
// cannot be told from a genuine component outside span(Q); the second pass removes it, so only
// then is the test of span_tolerance meaningful.
constexpr int64_t kMinNormalizePasses = 2;

// With normalize, a column is refused when ‖y_j‖ ≤ span_tolerance(k, eps) · ‖x_j‖: its residual
// is then rounding noise and normalizing it would return an arbitrary direction. The bound,
// kSpanTolerance · (eps + √max(k, 1) · eps64), covers the two roundings this op cannot see past:
// that of x and Q to the dtype (eps, the dtype's machine epsilon), and that of its own float64
// sums over k terms (eps64 = 2⁻⁵²; measured up to √k · eps64 · ‖x‖/2). The second matters in
// float64 only, where it grows with k: without it a float64 column in span(Q) passed for k of
// ~1000 and more. A float32 column formed in float32 arithmetic (Q @ a) carries its own
// rounding, up to ~√k · eps · ‖x‖ from span(Q): that distance is in the data, and is normalized.
constexpr double kSpanTolerance = 4.0;
inline double span_tolerance(int64_t basis, double eps) {
  const double sums = std::sqrt(static_cast<double>(std::max<int64_t>(basis, 1))) *
                      std::numeric_limits<double>::epsilon();
  return kSpanTolerance * (eps + sums);
}

// Checks Q, X, passes and normalize; every failure is a c10::Error naming the argument.
ProjectOutSizes check_project_out_args(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                                       bool normalize, at::DeviceType backend);

// Checks the extra arguments of the backward (grad_Y, Y, coeffs, norms) against Q and X. The
// values of norms (each > 0 and finite) are checked here when they are on the CPU; the CUDA
// kernel checks them on the device.
ProjectOutSizes check_project_out_backward_args(const at::Tensor& grad_Y, const at::Tensor& Q,
                                                const at::Tensor& X, const at::Tensor& Y,
                                                const at::Tensor& coeffs, const at::Tensor& norms,
                                                int64_t passes, bool normalize,
                                                at::DeviceType backend);

// The op's output_mask argument as an array, after checking its length: the schema says bool[2],
// but the dispatcher does not enforce a list's length.
std::array<bool, 2> project_out_output_mask(const c10::List<bool>& output_mask);

// Raises, naming the column, when a normalized column is (numerically) in span(Q) or not finite.
// x_sq and y_sq are the float64 squared column norms of X and of the unnormalized Y, on the CPU;
// basis is k.
void check_normalizable(const double* x_sq, const double* y_sq, int64_t columns, int64_t basis,
                        double eps);

// Forward: returns (Y, coeffs, norms): Y (n, p) in X's dtype; coeffs (passes, k, p) float64, the
// C_j; norms (p,) float64, ‖Y‖ per column before normalization, or (0,) without normalize.
using ProjectOutResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
ProjectOutResult project_out_forward_cpu(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                                         bool normalize);
ProjectOutResult project_out_forward_cuda(const at::Tensor& Q, const at::Tensor& X,
                                          int64_t passes, bool normalize);

// Backward: output_mask (2 entries) selects (grad_Q, grad_X); an output not asked for is an
// empty (0,) tensor. Y is the forward's output (Z when normalized).
using ProjectOutGrads = std::tuple<at::Tensor, at::Tensor>;
ProjectOutGrads project_out_backward_cpu(const at::Tensor& grad_Y, const at::Tensor& Q,
                                         const at::Tensor& X, const at::Tensor& Y,
                                         const at::Tensor& coeffs, const at::Tensor& norms,
                                         int64_t passes, bool normalize,
                                         const c10::List<bool>& output_mask);
ProjectOutGrads project_out_backward_cuda(const at::Tensor& grad_Y, const at::Tensor& Q,
                                          const at::Tensor& X, const at::Tensor& Y,
                                          const at::Tensor& coeffs, const at::Tensor& norms,
                                          int64_t passes, bool normalize,
                                          const c10::List<bool>& output_mask);

}  // namespace lowrank_ext
