// Every schema of the lowrank_ext namespace, in one place.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

TORCH_LIBRARY(lowrank_ext, m) {
  // Public op: y = ((x V) Sᵀ) Uᵀ + bias. Its autograd kernel (autograd/linear.cpp) runs
  // linear_forward and linear_backward; without gradients it goes straight to its backend kernel.
  m.def("linear(Tensor x, Tensor U, Tensor S, Tensor V, Tensor? bias=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Fused forward; t = x V (shape (batch, r)) is returned for backward when save_t, else (0,).
  // t is float32 for float16/bfloat16 inputs (it cannot overflow), else x's dtype.
  m.def(
      "linear_forward(Tensor x, Tensor U, Tensor S, Tensor V, Tensor? bias, bool save_t) "
      "-> (Tensor y, Tensor t)",
      {at::Tag::pt2_compliant_tag});
  // Fused backward; output_mask selects (grad_x, grad_U, grad_S, grad_V, grad_bias), the
  // outputs not asked for come back as empty (0,) tensors.
  m.def(
      "linear_backward(Tensor grad_y, Tensor x, Tensor t, Tensor U, Tensor S, Tensor V, "
      "bool[5] output_mask) -> (Tensor grad_x, Tensor grad_U, Tensor grad_S, Tensor grad_V, "
      "Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  // Public op: Y = X − Q(QᵀX) applied `passes` times, columns optionally normalized. Its
  // autograd kernel (autograd/project_out.cpp) runs project_out_forward and project_out_backward.
  m.def("project_out(Tensor Q, Tensor X, int passes=2, bool normalize=False) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Fused forward; also returns the float64 coefficients C_j = Qᵀ Y_j, shape (passes, k, p),
  // and the float64 column norms of Y before normalization, shape (p,) (or (0,)).
  m.def(
      "project_out_forward(Tensor Q, Tensor X, int passes, bool normalize) "
      "-> (Tensor Y, Tensor coeffs, Tensor norms)",
      {at::Tag::pt2_compliant_tag});
  // Fused backward; output_mask selects (grad_Q, grad_X), the others come back as (0,).
  m.def(
      "project_out_backward(Tensor grad_Y, Tensor Q, Tensor X, Tensor Y, Tensor coeffs, "
      "Tensor norms, int passes, bool normalize, bool[2] output_mask) "
      "-> (Tensor grad_Q, Tensor grad_X)",
      {at::Tag::pt2_compliant_tag});
}
