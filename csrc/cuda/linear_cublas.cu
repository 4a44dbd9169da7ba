// The default CUDA path of lowrank_ext::linear: cuBLAS GEMMs (through ATen) composed inside the
// op, so autograd, torch.compile, torch.export and CUDA graphs see the same ops whichever CUDA
// kernels run (backend.h). Tensor cores on every architecture, cuBLAS's own accumulation.
//
//   forward   t = x V (float32 for half inputs: it is saved, and |t| > 65504 must stay finite),
//             z = t Sᵀ in x's dtype, y = addmm(bias, z, Uᵀ) (cuBLASLt fuses the bias).
//   backward  g = dy U, dt = g S, dx = dt Vᵀ, dV = xᵀ dt, dU = dyᵀ z, dS = Σ g ⊙ t (gᵀ t for a
//             full core), dbias = Σ dy: one GEMM per gradient plus g, and t recomputed only when
//             the forward did not save it. Sums that end in a small tensor (g for dS, dS itself)
//             stay in float32 for half inputs.
#include "linear.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

namespace lowrank_ext {
namespace {

bool is_half(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}

// a @ b, in float32 when the inputs are half (cuBLAS accumulates in float32 either way).
at::Tensor mm_wide(const at::Tensor& a, const at::Tensor& b) {
  return is_half(a) ? at::mm(a, b, at::kFloat) : at::mm(a, b);
}

}  // namespace

at::Tensor saved_t_cuda(const at::Tensor& x2, const at::Tensor& V) { return mm_wide(x2, V); }

namespace {

// t Sᵀ (diagonal: t ⊙ s) in `dtype`, from t in float32 or dtype.
at::Tensor apply_core(const at::Tensor& t, const at::Tensor& S, bool transpose,
                      at::ScalarType dtype) {
  if (S.dim() == 1) {
    at::Tensor out = at::empty(t.sizes(), t.options().dtype(dtype));
    return at::mul_out(out, t, S);  // one kernel: float32 product rounded into dtype
  }
  const at::Tensor core = S.to(t.scalar_type());
  return at::mm(t, transpose ? core.t() : core).to(dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_forward_cublas(const at::Tensor& x, const at::Tensor& U,
                                                         const at::Tensor& S, const at::Tensor& V,
                                                         const std::optional<at::Tensor>& bias,
                                                         bool save_t) {
  const LinearSizes sz = check_linear_args(x, U, S, V, bias, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen calls below are internal
  const at::Tensor x2 = x.reshape({sz.batch, sz.in_features});
  const at::Tensor t = mm_wide(x2, V);
  const at::Tensor z = apply_core(t, S, /*transpose=*/true, x.scalar_type());
  const at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, z, U.t())
                                                           : at::mm(z, U.t());
  return {y.view(linear_output_shape(x, sz.out_features)),
          save_t ? t : at::empty({0}, x.options())};
}

LinearGrads linear_backward_cublas(const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& t, const at::Tensor& U, const at::Tensor& S,
                                   const at::Tensor& V, std::array<bool, 5> output_mask) {
  return linear_backward_cublas_given(grad_y, x, t, U, S, V, output_mask, at::Tensor(),
                                      at::Tensor());
}

LinearGrads linear_backward_cublas_given(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& t, const at::Tensor& U,
                                         const at::Tensor& S, const at::Tensor& V,
                                         std::array<bool, 5> output_mask, const at::Tensor& g_given,
                                         const at::Tensor& db_given) {
  const LinearSizes sz = check_linear_backward_args(grad_y, x, t, U, S, V, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [need_dx, need_dU, need_dS, need_dV, need_db] = output_mask;
  const at::ScalarType dtype = x.scalar_type();
  const at::Tensor dy2 = grad_y.reshape({sz.batch, sz.out_features});
  const at::Tensor x2 = x.reshape({sz.batch, sz.in_features});
  const at::Tensor tt = (need_dU || need_dS) ? (t.numel() != 0 ? t : mm_wide(x2, V)) : at::Tensor();
  // Every gradient not asked for is its own (0,) tensor: the schema's outputs must not alias.
  at::Tensor dx = at::empty({0}, x.options()), dU = at::empty({0}, x.options()),
             dS = at::empty({0}, x.options()), dV = at::empty({0}, x.options()),
             db = at::empty({0}, x.options());
  if (need_db) db = db_given.defined() ? db_given : dy2.sum(0);
  // A column-major factor gets a column-major gradient (grad_transposed): the transposed product.
  auto outer = [](const at::Tensor& a, const at::Tensor& b, bool transposed) {  // aᵀ b
    return transposed ? at::mm(b.t(), a).t() : at::mm(a.t(), b);
  };
  if (need_dU) dU = outer(dy2, apply_core(tt, S, /*transpose=*/true, dtype), grad_transposed(U));
  if (need_dS || need_dV || need_dx) {
    const at::Tensor g = g_given.defined() ? g_given : mm_wide(dy2, U);  // (batch, r)
    if (need_dS) {
      dS = (S.dim() == 1 ? (g * tt).sum(0) : outer(g, tt, grad_transposed(S))).to(dtype);
    }
    if (need_dV || need_dx) {
      const at::Tensor dt = apply_core(g, S, /*transpose=*/false, dtype);
      if (need_dV) dV = outer(x2, dt, grad_transposed(V));
      if (need_dx) dx = at::mm(dt, V.t()).view(x.sizes());
    }
  }
  return {dx, dU, dS, dV, db};
}

}  // namespace lowrank_ext
