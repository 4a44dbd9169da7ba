// Autograd of lowrank_ext::project_out and lowrank_ext::project_out_forward, in C++ (see
// autograd/linear.cpp for why). Forward saves Q, X, Y and the float64 coefficients and norms the
// fused project_out_backward op needs; double backward differentiates the plain formula.
#include "project_out.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOp = ProjectOutResult(const at::Tensor&, const at::Tensor&, int64_t, bool);
using BackwardOp = ProjectOutGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   int64_t, bool, const c10::List<bool>&);
using ProjectOutOp = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Y = X − Q(QᵀX) `passes` times, optionally normalized, with differentiable ATen ops.
at::Tensor plain_project_out(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                             bool normalize) {
  at::Tensor Y = X;
  for (int64_t j = 0; j < passes; ++j) Y = Y - at::matmul(Q, at::matmul(Q.t(), Y));
  return normalize ? Y / at::linalg_vector_norm(Y, 2, at::IntArrayRef{0}) : Y;
}

struct ProjectOutFunction : torch::autograd::Function<ProjectOutFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& Q, const at::Tensor& X,
                               int64_t passes, bool normalize) {
    static const auto op = find_op<ForwardOp>("lowrank_ext::project_out_forward");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [Y, coeffs, norms] = op.call(Q, X, passes, normalize);
    ctx->saved_data["passes"] = passes;
    ctx->saved_data["normalize"] = normalize;
    ctx->save_for_backward({Q, X, Y, coeffs, norms});
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({coeffs, norms});
    return {Y, coeffs, norms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &Q = saved[0], &X = saved[1], &Y = saved[2];
    const int64_t passes = ctx->saved_data["passes"].toInt();
    const bool normalize = ctx->saved_data["normalize"].toBool();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    const at::Tensor& dY = grad_outputs[0];
    variable_list grads(4);
    if (!dY.defined() || !(mask[0] || mask[1])) return grads;
    if (c10::GradMode::is_enabled()) {  // create_graph=True
      variable_list inputs;
      for (int i = 0; i < 2; ++i)
        if (mask[i]) inputs.push_back(saved[i]);
      const variable_list g = torch::autograd::grad({plain_project_out(Q, X, passes, normalize)},
                                                    inputs, {dY}, /*retain_graph=*/true,
                                                    /*create_graph=*/true);
      for (int i = 0, k = 0; i < 2; ++i)
        if (mask[i]) grads[i] = g[k++];
      return grads;
    }
    static const auto op = find_op<BackwardOp>("lowrank_ext::project_out_backward");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dQ, dX] = op.call(dY, Q, X, Y, saved[3], saved[4], passes, normalize,
                            c10::List<bool>({mask[0], mask[1]}));
    if (mask[0]) grads[0] = dQ;
    if (mask[1]) grads[1] = dX;
    return grads;
  }
};

// See refuse_forward_grad in autograd/linear.cpp.
void refuse_forward_grad(const at::Tensor& Q, const at::Tensor& X) {
  TORCH_CHECK(!Q._fw_grad(0).defined() && !X._fw_grad(0).defined(),
              "lowrank_ext.project_out: forward-mode AD (torch.autograd.forward_ad, "
              "torch.func.jvp) is not supported; use reverse mode (backward, torch.autograd.grad)");
}

bool needs_grad(const at::Tensor& Q, const at::Tensor& X) {
  return c10::GradMode::is_enabled() && (Q.requires_grad() || X.requires_grad());
}

at::Tensor project_out_autograd(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                                bool normalize) {
  refuse_forward_grad(Q, X);
  if (!needs_grad(Q, X)) {
    static const auto op = find_op<ProjectOutOp>("lowrank_ext::project_out");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(Q, X, passes, normalize);
  }
  return ProjectOutFunction::apply(Q, X, passes, normalize)[0];
}

ProjectOutResult project_out_forward_autograd(const at::Tensor& Q, const at::Tensor& X,
                                              int64_t passes, bool normalize) {
  refuse_forward_grad(Q, X);
  if (!needs_grad(Q, X)) {
    static const auto op = find_op<ForwardOp>("lowrank_ext::project_out_forward");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(Q, X, passes, normalize);
  }
  variable_list out = ProjectOutFunction::apply(Q, X, passes, normalize);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, Autograd, m) {
  m.impl("project_out", TORCH_FN(project_out_autograd));
  m.impl("project_out_forward", TORCH_FN(project_out_forward_autograd));
}

}  // namespace lowrank_ext
