// Autocast policy of lowrank_ext::linear and linear_forward (documented in README "Autocast"):
//   CUDA: floating inputs are cast to the autocast dtype (float16 or bfloat16), as F.linear is.
//   CPU:  floating inputs are cast to float32, since the CPU kernels run float32/float64 only.
// float64 inputs are never cast (autocast leaves them alone everywhere).
// lowrank_ext::project_out and project_out_forward run in float32 under autocast on every
// device: reduced precision would lose the orthogonality the op exists for.
#include "linear.h"
#include "project_out.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

template <c10::DeviceType device>
at::ScalarType linear_dtype() {
  return device == c10::DeviceType::CUDA ? at::autocast::get_autocast_dtype(device) : at::kFloat;
}

// The linear ops' leading arguments (x, U, S, V, bias) are cast; the rest pass through.
template <c10::DeviceType device, c10::DispatchKey key, typename Result, typename... Rest>
Result linear_autocast(const char* name, const at::Tensor& x, const at::Tensor& U,
                       const at::Tensor& S, const at::Tensor& V,
                       const std::optional<at::Tensor>& bias, Rest... rest) {
  // One op per instantiation (Result and Rest differ between linear and linear_forward).
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(name, "")
          .typed<Result(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const std::optional<at::Tensor>&, Rest...)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const at::ScalarType dtype = linear_dtype<device>();
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device); };
  std::optional<at::Tensor> cast_bias;
  if (bias.has_value() && bias->defined()) cast_bias = cast(*bias);
  return op.call(cast(x), cast(U), cast(S), cast(V), cast_bias, rest...);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor linear(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                  const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  return linear_autocast<device, key, at::Tensor>("lowrank_ext::linear", x, U, S, V, bias);
}

template <c10::DeviceType device, c10::DispatchKey key>
std::tuple<at::Tensor, at::Tensor> linear_forward(const at::Tensor& x, const at::Tensor& U,
                                                  const at::Tensor& S, const at::Tensor& V,
                                                  const std::optional<at::Tensor>& bias,
                                                  bool save_t) {
  return linear_autocast<device, key, std::tuple<at::Tensor, at::Tensor>, bool>(
      "lowrank_ext::linear_forward", x, U, S, V, bias, save_t);
}

template <c10::DeviceType device, c10::DispatchKey key, typename Result>
Result project_out_autocast(const char* name, const at::Tensor& Q, const at::Tensor& X,
                            int64_t passes, bool normalize) {
  static const auto op = c10::Dispatcher::singleton()  // one op per Result type
                             .findSchemaOrThrow(name, "")
                             .typed<Result(const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  auto cast = [](const at::Tensor& t) { return at::autocast::cached_cast(at::kFloat, t, device); };
  return op.call(cast(Q), cast(X), passes, normalize);
}

template <c10::DeviceType device, c10::DispatchKey key>
at::Tensor project_out(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                       bool normalize) {
  return project_out_autocast<device, key, at::Tensor>("lowrank_ext::project_out", Q, X, passes,
                                                       normalize);
}

template <c10::DeviceType device, c10::DispatchKey key>
ProjectOutResult project_out_forward(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                                     bool normalize) {
  return project_out_autocast<device, key, ProjectOutResult>("lowrank_ext::project_out_forward",
                                                             Q, X, passes, normalize);
}

template <c10::DeviceType device, c10::DispatchKey key>
void register_autocast(torch::Library& m) {
  m.impl("linear", TORCH_FN((linear<device, key>)));
  m.impl("linear_forward", TORCH_FN((linear_forward<device, key>)));
  m.impl("project_out", TORCH_FN((project_out<device, key>)));
  m.impl("project_out_forward", TORCH_FN((project_out_forward<device, key>)));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCUDA, m) {
  register_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>(m);
}

TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCPU, m) {
  register_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>(m);
}

}  // namespace lowrank_ext
