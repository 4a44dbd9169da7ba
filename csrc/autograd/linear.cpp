// Autograd of lowrank_ext::linear and lowrank_ext::linear_forward, in C++: a call costs the
// dispatcher and the kernels, with no Python frame in between (issue: per-call overhead).
//
// Forward runs linear_forward below autograd and saves x, U, S, V and t = x V (never W); backward
// is the fused linear_backward op. Double backward (create_graph=True) differentiates the plain
// formula rebuilt from the saved inputs instead, as the fused backward has no derivative of its
// own. Without grad mode or without an input that requires grad, the call goes straight to the
// backend kernel: nothing is saved.
#include "linear.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

namespace lowrank_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, bool);
using BackwardOp = LinearGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const c10::List<bool>&);
using LinearOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// y = ((x V) Sᵀ) Uᵀ with differentiable ATen ops, for double backward only.
at::Tensor plain_linear(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                        const at::Tensor& V) {
  const at::Tensor t = at::matmul(x, V);
  return at::matmul(S.dim() == 1 ? t * S : at::matmul(t, S.t()), U.t());
}

// Σ of dy over every leading dim: (out_features,), also for an empty batch or out_features = 0.
at::Tensor sum_over_batch(const at::Tensor& dy) {
  std::vector<int64_t> dims(static_cast<size_t>(dy.dim() - 1));
  std::iota(dims.begin(), dims.end(), int64_t{0});
  return dims.empty() ? dy : dy.sum(dims);
}

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) has no formula here: refuse a
// tangent rather than drop it (the backend kernel would return y with no tangent at all).
void refuse_forward_grad(const char* op, std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* t : inputs) {
    TORCH_CHECK(t == nullptr || !t->defined() || !t->_fw_grad(/*level=*/0).defined(), op,
                ": forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is not supported; "
                "use reverse mode (backward, torch.autograd.grad)");
  }
}

struct LinearFunction : torch::autograd::Function<LinearFunction> {
  // Returns (y, t): t = x V when return_t, else an empty (0,) tensor (t is saved either way).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& U,
                               const at::Tensor& S, const at::Tensor& V,
                               const std::optional<at::Tensor>& bias, bool return_t) {
    static const auto op = find_op<ForwardOp>("lowrank_ext::linear_forward");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, t] = op.call(x, U, S, V, bias, /*save_t=*/true);
    // An absent bias is no input variable: needs_input_grad counts x, U, S, V (and bias).
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, U, S, V, t});
    ctx->set_materialize_grads(false);  // t's gradient is never used: do not allocate it
    at::Tensor t_out = return_t ? t : at::empty({0}, t.options());
    ctx->mark_non_differentiable({t_out});
    return {y, t_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &U = saved[1], &S = saved[2], &V = saved[3], &t = saved[4];
    const at::Tensor& dy = grad_outputs[0];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 5> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   ctx->needs_input_grad(2), ctx->needs_input_grad(3),
                                   has_bias && ctx->needs_input_grad(4)};
    variable_list grads(6);
    if (!dy.defined()) return grads;  // y was not used: every gradient is zero
    if (c10::GradMode::is_enabled()) {
      // create_graph=True: gradients of the plain formula, themselves differentiable.
      variable_list inputs;
      for (int i = 0; i < 4; ++i)
        if (mask[i]) inputs.push_back(saved[i]);
      if (!inputs.empty()) {
        const variable_list g = torch::autograd::grad({plain_linear(x, U, S, V)}, inputs, {dy},
                                                      /*retain_graph=*/true,
                                                      /*create_graph=*/true);
        for (int i = 0, k = 0; i < 4; ++i)
          if (mask[i]) grads[i] = g[k++];
      }
      if (mask[4]) grads[4] = sum_over_batch(dy);
      return grads;
    }
    static const auto op = find_op<BackwardOp>("lowrank_ext::linear_backward");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dU, dS, dV, db] =
        op.call(dy, x, t, U, S, V, c10::List<bool>({mask[0], mask[1], mask[2], mask[3], mask[4]}));
    const at::Tensor computed[5] = {dx, dU, dS, dV, db};
    for (int i = 0; i < 5; ++i)
      if (mask[i]) grads[i] = computed[i];
    return grads;
  }
};

bool needs_grad(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  return c10::GradMode::is_enabled() &&
         (x.requires_grad() || U.requires_grad() || S.requires_grad() || V.requires_grad() ||
          (bias.has_value() && bias->defined() && bias->requires_grad()));
}

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                           const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  refuse_forward_grad("lowrank_ext.linear", {&x, &U, &S, &V, bias ? &*bias : nullptr});
  if (!needs_grad(x, U, S, V, bias)) {
    static const auto op = find_op<LinearOp>("lowrank_ext::linear");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, U, S, V, bias);
  }
  return LinearFunction::apply(x, U, S, V, bias, false)[0];
}

std::tuple<at::Tensor, at::Tensor> linear_forward_autograd(const at::Tensor& x,
                                                           const at::Tensor& U,
                                                           const at::Tensor& S,
                                                           const at::Tensor& V,
                                                           const std::optional<at::Tensor>& bias,
                                                           bool save_t) {
  refuse_forward_grad("lowrank_ext.linear_forward", {&x, &U, &S, &V, bias ? &*bias : nullptr});
  if (!needs_grad(x, U, S, V, bias)) {
    static const auto op = find_op<ForwardOp>("lowrank_ext::linear_forward");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, U, S, V, bias, save_t);
  }
  variable_list out = LinearFunction::apply(x, U, S, V, bias, save_t);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, Autograd, m) {
  m.impl("linear", TORCH_FN(linear_autograd));
  m.impl("linear_forward", TORCH_FN(linear_forward_autograd));
}

}  // namespace lowrank_ext
