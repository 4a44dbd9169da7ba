// lowrank_ext::linear as a composite of linear_forward: autograd, autocast, fake tensors and
// torch.compile all see linear_forward, and t is only written when a gradient will need it.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

at::Tensor linear_composite(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                            const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("lowrank_ext::linear_forward", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  const bool bias_requires_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  const bool save_t = c10::GradMode::is_enabled() &&
                      (x.requires_grad() || U.requires_grad() || S.requires_grad() ||
                       V.requires_grad() || bias_requires_grad);
  return std::get<0>(forward.call(x, U, S, V, bias, save_t));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CompositeImplicitAutograd, m) {
  m.impl("linear", TORCH_FN(linear_composite));
}

}  // namespace lowrank_ext
