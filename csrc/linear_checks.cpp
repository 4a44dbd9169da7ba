// Argument checks for lowrank_ext::linear, shared by every backend.
#include "linear.h"

#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

namespace lowrank_ext {
namespace {

bool dtype_supported(at::ScalarType dtype, at::DeviceType backend) {
  switch (dtype) {
    case at::kFloat:
    case at::kDouble:
      return true;
    case at::kHalf:
    case at::kBFloat16:
      return backend == at::kCUDA;
    default:
      return false;
  }
}

const char* supported_dtypes(at::DeviceType backend) {
  return backend == at::kCUDA ? "float32, float64, float16 or bfloat16"
                              : "float32 or float64";
}

void check_same_dtype_and_device(const at::Tensor& x, const at::Tensor& other, const char* name,
                                 const char* op) {
  TORCH_CHECK(other.scalar_type() == x.scalar_type(), op, ": argument '", name,
              "' has dtype ", other.scalar_type(), " but x has dtype ", x.scalar_type(),
              "; all of x, U, S, V and bias must share one dtype");
  TORCH_CHECK(other.device() == x.device(), op, ": argument '", name, "' is on ",
              other.device(), " but x is on ", x.device(),
              "; all of x, U, S, V and bias must be on one device");
}

}  // namespace

LinearSizes check_linear_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                              const at::Tensor& V, const std::optional<at::Tensor>& bias,
                              at::DeviceType backend) {
  constexpr const char* op = "lowrank_ext.linear";
  TORCH_CHECK(x.dim() >= 1, op, ": argument 'x' must have at least 1 dimension (..., in_features), ",
              "got a 0-d tensor");
  TORCH_CHECK(dtype_supported(x.scalar_type(), backend), op, ": argument 'x' has dtype ",
              x.scalar_type(), "; the ", c10::DeviceTypeName(backend), " kernel supports ",
              supported_dtypes(backend));
  TORCH_CHECK(U.dim() == 2, op, ": argument 'U' must be 2-D of shape (out_features, rank), got shape ",
              U.sizes());
  TORCH_CHECK(V.dim() == 2, op, ": argument 'V' must be 2-D of shape (in_features, rank), got shape ",
              V.sizes());
  const int64_t rank = U.size(1);
  TORCH_CHECK(rank >= 1, op, ": argument 'U' must have at least one column (rank >= 1), got shape ",
              U.sizes());
  TORCH_CHECK(V.size(1) == rank, op, ": argument 'V' has ", V.size(1), " columns but U has ",
              rank, "; U (out_features, rank) and V (in_features, rank) must share the rank");
  TORCH_CHECK(V.size(0) == x.size(-1), op, ": argument 'V' has shape ", V.sizes(),
              " but x has ", x.size(-1), " features in its last dimension; V must be (",
              x.size(-1), ", rank)");
  const bool diagonal = S.dim() == 1;
  TORCH_CHECK((S.dim() == 1 && S.size(0) == rank) ||
                  (S.dim() == 2 && S.size(0) == rank && S.size(1) == rank),
              op, ": argument 'S' must have shape (", rank, ",) for a diagonal core or (", rank,
              ", ", rank, ") for a full core, got shape ", S.sizes());
  check_same_dtype_and_device(x, U, "U", op);
  check_same_dtype_and_device(x, S, "S", op);
  check_same_dtype_and_device(x, V, "V", op);
  const int64_t out_features = U.size(0);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op,
                ": argument 'bias' must have shape (", out_features, ",) (out_features), got shape ",
                bias->sizes());
    check_same_dtype_and_device(x, *bias, "bias", op);
  }
  const int64_t in_features = x.size(-1);
  const int64_t batch = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  return LinearSizes{batch, in_features, out_features, rank, diagonal};
}

LinearSizes check_linear_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& t, const at::Tensor& U,
                                       const at::Tensor& S, const at::Tensor& V,
                                       at::DeviceType backend) {
  constexpr const char* op = "lowrank_ext.linear_backward";
  const LinearSizes sizes = check_linear_args(x, U, S, V, std::nullopt, backend);
  const auto expected = linear_output_shape(x, sizes.out_features);
  TORCH_CHECK(grad_y.sizes().equals(expected), op, ": argument 'grad_y' must have shape ",
              c10::IntArrayRef(expected), " (x's leading dims, out_features), got shape ",
              grad_y.sizes());
  check_same_dtype_and_device(x, grad_y, "grad_y", op);
  // t is absent (shape (0,): recomputed when needed) or the saved x V; nothing else.
  const bool t_absent = t.dim() == 1 && t.size(0) == 0;
  TORCH_CHECK(t_absent || (t.dim() == 2 && t.size(0) == sizes.batch && t.size(1) == sizes.rank),
              op, ": argument 't' (the saved x V) must have shape (", sizes.batch, ", ", sizes.rank,
              ") or (0,) when it was not saved, got shape ", t.sizes());
  if (!t_absent) {
    TORCH_CHECK(t.scalar_type() == saved_t_dtype(x.scalar_type()), op,
                ": argument 't' (the saved x V) has dtype ", t.scalar_type(), " but must be ",
                saved_t_dtype(x.scalar_type()), " for x of dtype ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": argument 't' is on ", t.device(),
                " but x is on ", x.device());
  }
  return sizes;
}

std::array<bool, 5> linear_output_mask(const c10::List<bool>& output_mask) {
  TORCH_CHECK(output_mask.size() == 5, "lowrank_ext.linear_backward: argument 'output_mask' must ",
              "have 5 entries (grad_x, grad_U, grad_S, grad_V, grad_bias), got ",
              output_mask.size());
  return {output_mask.get(0), output_mask.get(1), output_mask.get(2), output_mask.get(3),
          output_mask.get(4)};
}

bool grad_transposed(const at::Tensor& factor) {
  return factor.dim() == 2 && factor.size(0) > 1 && factor.size(1) > 1 && factor.stride(0) == 1 &&
         factor.stride(1) == factor.size(0);
}

at::Tensor in_grad_layout(const at::Tensor& grad, const at::Tensor& factor) {
  if (grad.dim() != 2) return grad;  // (0,) when not asked for, or a diagonal core's vector
  const bool transposed = grad_transposed(factor);
  if (transposed ? grad_transposed(grad) : grad.is_contiguous()) return grad;
  if (!transposed) return grad.contiguous();
  return grad.t().contiguous().t();
}

at::ScalarType saved_t_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kHalf || x_dtype == at::kBFloat16 ? at::kFloat : x_dtype;
}

std::vector<int64_t> linear_output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

}  // namespace lowrank_ext
