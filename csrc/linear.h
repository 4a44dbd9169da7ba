// lowrank_ext::linear — y = ((x V) Sᵀ) Uᵀ + bias, with W = U S Vᵀ never formed.
//
// Shapes: x (..., in), U (out, r), S (r) diagonal or (r, r) core, V (in, r), bias (out).
// Shared by the CPU and CUDA backends: the argument checks and the kernel signatures.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace lowrank_ext {

// Sizes of one call, after the checks: the batch is every leading dim of x folded together.
struct LinearSizes {
  int64_t batch;         // product of x's leading dims (0 allowed)
  int64_t in_features;   // n
  int64_t out_features;  // m
  int64_t rank;          // r >= 1
  bool diagonal_core;    // S is a vector
};

// Checks x, U, S, V, bias for a forward call and returns the sizes. Every failure is a
// c10::Error (RuntimeError in Python) whose message names the argument and what was expected.
LinearSizes check_linear_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                              const at::Tensor& V, const std::optional<at::Tensor>& bias,
                              at::DeviceType backend);

// Checks the extra arguments of the backward op (grad_y, and t when it is needed).
LinearSizes check_linear_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& t, const at::Tensor& U,
                                       const at::Tensor& S, const at::Tensor& V,
                                       at::DeviceType backend);

// The op's output_mask argument as an array, after checking its length: the schema says
// bool[5], but the dispatcher does not enforce a list's length.
std::array<bool, 5> linear_output_mask(const c10::List<bool>& output_mask);

// The layout of a factor's gradient. A gradient with the strides of its parameter is what
// autograd's AccumulateGrad takes as it is; any other layout costs a copy (or a strided add)
// per backward. ATen's own mm gradients follow the input's layout, so these do too: a factor
// (U, V or a full core S) that is column-major (stride(0) == 1, stride(1) == rows, both sizes
// > 1, as torch.linalg.qr and svd return it) gets a column-major gradient, anything else a
// row-major contiguous one.
bool grad_transposed(const at::Tensor& factor);
// grad itself when its layout is the one grad_transposed(factor) asks for, else a copy in it.
at::Tensor in_grad_layout(const at::Tensor& grad, const at::Tensor& factor);

// Output shape of y: x's leading dims followed by out_features.
std::vector<int64_t> linear_output_shape(const at::Tensor& x, int64_t out_features);

// dtype of the saved t = x V: float32 for float16/bfloat16 x (so |t| > 65504 stays finite in
// float16, and the backward's sums read full-precision t), else x's dtype.
at::ScalarType saved_t_dtype(at::ScalarType x_dtype);

// Forward kernels. Return (y, t): y has shape (..., out); t = x V has shape (batch, r) and dtype
// saved_t_dtype(x) when save_t is true, and shape (0,) otherwise. Inputs may be non-contiguous.
std::tuple<at::Tensor, at::Tensor> linear_forward_cpu(const at::Tensor& x, const at::Tensor& U,
                                                      const at::Tensor& S, const at::Tensor& V,
                                                      const std::optional<at::Tensor>& bias,
                                                      bool save_t);
std::tuple<at::Tensor, at::Tensor> linear_forward_cuda(const at::Tensor& x, const at::Tensor& U,
                                                       const at::Tensor& S, const at::Tensor& V,
                                                       const std::optional<at::Tensor>& bias,
                                                       bool save_t);

// The two CUDA implementations behind linear_forward_cuda / linear_backward_cuda (backend.h):
// the cuBLAS composition (cuda/linear_cublas.cu, the default) and the SIMT fused kernels
// (cuda/linear.cu).
std::tuple<at::Tensor, at::Tensor> linear_forward_cublas(const at::Tensor& x, const at::Tensor& U,
                                                         const at::Tensor& S, const at::Tensor& V,
                                                         const std::optional<at::Tensor>& bias,
                                                         bool save_t);
std::tuple<at::Tensor, at::Tensor> linear_forward_fused(const at::Tensor& x, const at::Tensor& U,
                                                        const at::Tensor& S, const at::Tensor& V,
                                                        const std::optional<at::Tensor>& bias,
                                                        bool save_t);

// The tensor-core forward (cuda/linear_tensorcore.cu, built only with CUTLASS headers, macro
// LOWRANK_EXT_WITH_TENSORCORE): float16/bfloat16 and 1 <= r <= 256 (tensorcore_takes); any other
// call runs linear_forward_cublas. The backward of the "tensorcore" set is linear_backward_cublas.
std::tuple<at::Tensor, at::Tensor> linear_forward_tensorcore(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
    const std::optional<at::Tensor>& bias, bool save_t);
bool tensorcore_takes(const at::Tensor& x, int64_t rank);

// t = x V as the CUDA forwards save it (dtype saved_t_dtype), from x as (batch, in).
at::Tensor saved_t_cuda(const at::Tensor& x2, const at::Tensor& V);

// Backward kernels. output_mask selects (grad_x, grad_U, grad_S, grad_V, grad_bias); an output
// that is not asked for is returned as an empty tensor of shape (0,). grad_x has x's shape.
// t is the saved x V of shape (batch, r) (dtype saved_t_dtype), or (0,) (then recomputed); it is
// only read when grad_U or grad_S is asked for. The registered kernels (_cpu, _cuda) take the
// op's output_mask list and check it; the CUDA implementations behind them take the array.
using LinearGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
LinearGrads linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& t,
                                const at::Tensor& U, const at::Tensor& S, const at::Tensor& V,
                                const c10::List<bool>& output_mask);
LinearGrads linear_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& t, const at::Tensor& U, const at::Tensor& S,
                                 const at::Tensor& V, const c10::List<bool>& output_mask);
LinearGrads linear_backward_cublas(const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& t, const at::Tensor& U, const at::Tensor& S,
                                   const at::Tensor& V, std::array<bool, 5> output_mask);
// The tensorcore backward: g = dy U and dbias from one pass over dy (the forward kernel's first
// phase), the other gradients from linear_backward_cublas_given.
LinearGrads linear_backward_tensorcore(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& t, const at::Tensor& U,
                                       const at::Tensor& S, const at::Tensor& V,
                                       std::array<bool, 5> output_mask);
// linear_backward_cublas with g = dy U (float32 for half inputs) and dbias already computed
// (either may be undefined: then computed here).
LinearGrads linear_backward_cublas_given(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& t, const at::Tensor& U,
                                         const at::Tensor& S, const at::Tensor& V,
                                         std::array<bool, 5> output_mask, const at::Tensor& g_given,
                                         const at::Tensor& db_given);
LinearGrads linear_backward_fused(const at::Tensor& grad_y, const at::Tensor& x,
                                  const at::Tensor& t, const at::Tensor& U, const at::Tensor& S,
                                  const at::Tensor& V, std::array<bool, 5> output_mask);

}  // namespace lowrank_ext
