// Autocast policy of lowrank_ext::linear_forward (documented in README "Autocast"):
//   CUDA: floating inputs are cast to the autocast dtype (float16 or bfloat16), as F.linear is.
//   CPU:  floating inputs are cast to float32, since the CPU kernels run float32/float64 only.
// float64 inputs are never cast (autocast leaves them alone everywhere).
// lowrank_ext::project_out_forward runs in float32 under autocast on every device: reduced
// precision would lose the orthogonality the op exists for.
#include "project_out.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

using Forward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, bool);

template <c10::DeviceType device, c10::DispatchKey autocast_key>
std::tuple<at::Tensor, at::Tensor> linear_forward_autocast(const at::Tensor& x, const at::Tensor& U,
                                                           const at::Tensor& S, const at::Tensor& V,
                                                           const std::optional<at::Tensor>& bias,
                                                           bool save_t) {
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("lowrank_ext::linear_forward", "")
                            .typed<Forward>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::ScalarType dtype =
      device == c10::DeviceType::CUDA ? at::autocast::get_autocast_dtype(device) : at::kFloat;
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device); };
  std::optional<at::Tensor> cast_bias;
  if (bias.has_value() && bias->defined()) cast_bias = cast(*bias);
  return forward.call(cast(x), cast(U), cast(S), cast(V), cast_bias, save_t);
}

template <c10::DeviceType device, c10::DispatchKey autocast_key>
ProjectOutResult project_out_forward_autocast(const at::Tensor& Q, const at::Tensor& X,
                                              int64_t passes, bool normalize) {
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("lowrank_ext::project_out_forward", "")
                            .typed<ProjectOutResult(const at::Tensor&, const at::Tensor&,
                                                    int64_t, bool)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  auto cast = [](const at::Tensor& t) { return at::autocast::cached_cast(at::kFloat, t, device); };
  return forward.call(cast(Q), cast(X), passes, normalize);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCUDA, m) {
  m.impl("linear_forward",
         TORCH_FN((linear_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>)));
  m.impl("project_out_forward",
         TORCH_FN((project_out_forward_autocast<c10::DeviceType::CUDA,
                                                c10::DispatchKey::AutocastCUDA>)));
}

TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCPU, m) {
  m.impl("linear_forward",
         TORCH_FN((linear_forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>)));
  m.impl("project_out_forward",
         TORCH_FN((project_out_forward_autocast<c10::DeviceType::CPU,
                                                c10::DispatchKey::AutocastCPU>)));
}

}  // namespace lowrank_ext
