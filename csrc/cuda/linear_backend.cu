// lowrank_ext::linear on CUDA: the kernels chosen by set_cuda_kernels (backend.h) on each call.
// "tensorcore" runs the backward's first pass (g = dy U, dbias) itself, the rest composed.
// Every implementation saves the same t (dtype saved_t_dtype), so a forward run by one may be
// differentiated by the other.
#include "backend.h"
#include "linear.h"

#include <torch/library.h>

namespace lowrank_ext {

std::tuple<at::Tensor, at::Tensor> linear_forward_cuda(const at::Tensor& x, const at::Tensor& U,
                                                       const at::Tensor& S, const at::Tensor& V,
                                                       const std::optional<at::Tensor>& bias,
                                                       bool save_t) {
  switch (cuda_kernels()) {
    case CudaKernels::kFused:
      return linear_forward_fused(x, U, S, V, bias, save_t);
#ifdef LOWRANK_EXT_WITH_TENSORCORE
    case CudaKernels::kTensorcore:  // falls back to the composition for what it does not take
      return linear_forward_tensorcore(x, U, S, V, bias, save_t);
#endif
    default:
      return linear_forward_cublas(x, U, S, V, bias, save_t);
  }
}

LinearGrads linear_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& t, const at::Tensor& U, const at::Tensor& S,
                                 const at::Tensor& V, const c10::List<bool>& output_mask) {
  const std::array<bool, 5> mask = linear_output_mask(output_mask);
  switch (cuda_kernels()) {
    case CudaKernels::kFused: {  // its kernels write row-major gradients
      auto [dx, dU, dS, dV, db] = linear_backward_fused(grad_y, x, t, U, S, V, mask);
      return {dx, in_grad_layout(dU, U), in_grad_layout(dS, S), in_grad_layout(dV, V), db};
    }
#ifdef LOWRANK_EXT_WITH_TENSORCORE
    case CudaKernels::kTensorcore:  // g and dbias on tensor cores, the rest composed
      return linear_backward_tensorcore(grad_y, x, t, U, S, V, mask);
#endif
    default:
      return linear_backward_cublas(grad_y, x, t, U, S, V, mask);
  }
}

namespace {
at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                       const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  return std::get<0>(linear_forward_cuda(x, U, S, V, bias, /*save_t=*/false));
}
}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("linear", TORCH_FN(linear_cuda));
  m.impl("linear_forward", TORCH_FN(linear_forward_cuda));
  m.impl("linear_backward", TORCH_FN(linear_backward_cuda));
}

}  // namespace lowrank_ext
