// Argument checks for lowrank_ext::project_out, shared by every backend.
#include "project_out.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace lowrank_ext {
namespace {

constexpr const char* kOp = "lowrank_ext.project_out";

void check_like(const at::Tensor& ref, const char* ref_name, const at::Tensor& other,
                const char* name) {
  TORCH_CHECK(other.scalar_type() == ref.scalar_type(), kOp, ": argument '", name,
              "' has dtype ", other.scalar_type(), " but ", ref_name, " has dtype ",
              ref.scalar_type(), "; they must share one dtype");
  TORCH_CHECK(other.device() == ref.device(), kOp, ": argument '", name, "' is on ",
              other.device(), " but ", ref_name, " is on ", ref.device(),
              "; they must be on one device");
}

}  // namespace

ProjectOutSizes check_project_out_args(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                                       bool normalize, at::DeviceType backend) {
  TORCH_CHECK(X.dim() == 2, kOp, ": argument 'X' must be 2-D of shape (n, p), got shape ",
              X.sizes());
  TORCH_CHECK(Q.dim() == 2, kOp, ": argument 'Q' must be 2-D of shape (n, k), got shape ",
              Q.sizes());
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble, kOp,
              ": argument 'X' has dtype ", X.scalar_type(),
              "; project_out runs in float32 or float64 only (reduced precision loses the "
              "orthogonality it exists for)");
  TORCH_CHECK(X.device().type() == backend, kOp, ": argument 'X' is on ", X.device(),
              " but this is the ", c10::DeviceTypeName(backend), " kernel");
  check_like(X, "X", Q, "Q");
  TORCH_CHECK(Q.size(0) == X.size(0), kOp, ": argument 'Q' has shape ", Q.sizes(),
              " but X has ", X.size(0), " rows; Q must be (", X.size(0), ", k)");
  TORCH_CHECK(passes >= 1 && passes <= kMaxPasses, kOp, ": argument 'passes' must be in [1, ",
              kMaxPasses, "] (1 = classical Gram-Schmidt, 2 = CGS2, already orthogonal to working ",
              "precision), got ", passes);
  TORCH_CHECK(!normalize || passes >= kMinNormalizePasses, kOp,
              ": argument 'passes' must be >= ", kMinNormalizePasses, " with normalize=True, got ",
              passes, ": after one pass a column in span(Q) keeps Q's own rounding error, which ",
              "cannot be told from a component outside span(Q) (and would be normalized to a ",
              "unit vector in span(Q))");
  return {X.size(0), Q.size(1), X.size(1)};
}

ProjectOutSizes check_project_out_backward_args(const at::Tensor& grad_Y, const at::Tensor& Q,
                                                const at::Tensor& X, const at::Tensor& Y,
                                                const at::Tensor& coeffs, const at::Tensor& norms,
                                                int64_t passes, bool normalize,
                                                at::DeviceType backend) {
  const ProjectOutSizes sz = check_project_out_args(Q, X, passes, normalize, backend);
  check_like(X, "X", grad_Y, "grad_Y");
  check_like(X, "X", Y, "Y");
  TORCH_CHECK(grad_Y.sizes() == X.sizes(), kOp, ": argument 'grad_Y' has shape ",
              grad_Y.sizes(), " but X has shape ", X.sizes());
  TORCH_CHECK(Y.sizes() == X.sizes(), kOp, ": argument 'Y' has shape ", Y.sizes(),
              " but X has shape ", X.sizes());
  TORCH_CHECK(coeffs.scalar_type() == at::kDouble && coeffs.device() == X.device(), kOp,
              ": argument 'coeffs' must be float64 on ", X.device(), ", got ",
              coeffs.scalar_type(), " on ", coeffs.device());
  TORCH_CHECK(coeffs.dim() == 3 && coeffs.size(0) == passes && coeffs.size(1) == sz.basis &&
                  coeffs.size(2) == sz.columns,
              kOp, ": argument 'coeffs' must be (", passes, ", ", sz.basis, ", ", sz.columns,
              "), got shape ", coeffs.sizes());
  const int64_t norms_len = normalize ? sz.columns : 0;
  TORCH_CHECK(norms.scalar_type() == at::kDouble && norms.device() == X.device() &&
                  norms.dim() == 1 && norms.size(0) == norms_len,
              kOp, ": argument 'norms' must be float64 of shape (", norms_len, ") on ",
              X.device(), ", got ", norms.scalar_type(), " of shape ", norms.sizes(), " on ",
              norms.device());
  if (normalize && norms.device().is_cpu()) {
    // The forward's ‖Y‖ per column, which it only returns when > 0 and finite; the backward
    // divides by them (0 would give NaN or Inf gradients, a negative one a wrong sign).
    const at::Tensor values = norms.contiguous();
    const double* norm = values.const_data_ptr<double>();
    for (int64_t j = 0; j < sz.columns; ++j) {
      TORCH_CHECK(norm[j] > 0 && std::isfinite(norm[j]), kOp, ": entry ", j,
                  " of argument 'norms' is ", norm[j], "; the norms of the forward's columns "
                  "before normalization are > 0 and finite (pass the norms project_out_forward "
                  "returned)");
    }
  }
  return sz;
}

std::array<bool, 2> project_out_output_mask(const c10::List<bool>& output_mask) {
  TORCH_CHECK(output_mask.size() == 2, "lowrank_ext.project_out_backward: argument ",
              "'output_mask' must have 2 entries (grad_Q, grad_X), got ", output_mask.size());
  return {output_mask.get(0), output_mask.get(1)};
}

void check_normalizable(const double* x_sq, const double* y_sq, int64_t columns, int64_t basis,
                        double eps) {
  const double tolerance = span_tolerance(basis, eps);
  for (int64_t j = 0; j < columns; ++j) {
    const double x_norm = std::sqrt(x_sq[j]), y_norm = std::sqrt(y_sq[j]);
    TORCH_CHECK(std::isfinite(x_norm) && std::isfinite(y_norm), kOp,
                ": column ", j, " of argument 'X' has a non-finite norm after projection ",
                "(NaN or Inf in Q or X); cannot normalize it");
    TORCH_CHECK(y_norm > tolerance * x_norm, kOp, ": column ", j,
                " of argument 'X' is zero or lies in span(Q) to working precision (residual norm ",
                y_norm, " <= ", tolerance, " x column norm ", x_norm,
                ", the bound 4*(eps + sqrt(k)*2^-52)); normalize=True would return an arbitrary ",
                "direction. Draw a new column or grow from one outside span(Q)");
  }
}

}  // namespace lowrank_ext
