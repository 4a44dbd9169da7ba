// CUDA kernels of lowrank_ext::project_out (float32, float64; every sum in float64).
//
// The algorithm of project_out.h, from five small kernels:
//   subtract      out = in − Q C: one warp per row; the lanes split the k terms of each column's
//                 dot product and a fixed shuffle tree sums them. Q is read a row per warp,
//                 coalesced.
//   gram          Qᵀ A over parts of the rows: one thread per (k, p) entry of a part walks the
//                 part's rows (consecutive threads read consecutive entries of a row of Q);
//                 the parts are then summed in order.
//   column dots   Σ_i A[i, c] B[i, c], in the same two stages.
//   scale         out = (G − Z s) / norm, elementwise.
//   grad Q        dQ = −Σ_j (G_{j+1} C_jᵀ + Y_j D_jᵀ), one thread per entry of dQ.
// No atomics and fixed summation orders: bit-reproducible run to run on one device. 64-bit
// indices throughout; nothing is launched for empty operands.
#include "project_out.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace lowrank_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxGrid = 65535;  // grid.y limit, also a sane cap for grid-stride loops

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int grid_for(int64_t work) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(work, kThreads), 1, kMaxGrid));
}

// Parts of the rows for a two-stage reduction whose result has `size` entries: about 2^20
// threads in all, at least 32 rows a part.
int64_t row_parts(int64_t n, int64_t size) {
  const int64_t target = (int64_t(1) << 20) / std::max<int64_t>(size, 1);
  return std::clamp<int64_t>(std::min(target, ceil_div(n, 32)), 1, kMaxGrid);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    subtract_kernel(const scalar_t* __restrict__ Q, const double* __restrict__ C,
                    const scalar_t* in, scalar_t* out, int64_t n, int64_t k, int64_t p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / kWarp);
  for (int64_t i = blockIdx.x * int64_t(kThreads / kWarp) + threadIdx.x / kWarp; i < n;
       i += warps) {
    const scalar_t* q = Q + i * k;
    for (int64_t c = 0; c < p; ++c) {
      double acc = 0.0;
      for (int64_t kk = lane; kk < k; kk += kWarp) acc += static_cast<double>(q[kk]) * C[kk * p + c];
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      }
      // One lane reads in[i, c] and writes out[i, c]: in and out may be the same matrix.
      if (lane == 0) out[i * p + c] = static_cast<scalar_t>(static_cast<double>(in[i * p + c]) - acc);
    }
  }
}

// partial[part][kk * p + c] = Σ_{i in part} Q[i, kk] A[i, c].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gram_partial_kernel(const scalar_t* __restrict__ Q, const scalar_t* __restrict__ A,
                        double* __restrict__ partial, int64_t n, int64_t k, int64_t p,
                        int64_t rows_per_part) {
  const int64_t kp = k * p;
  const int64_t i0 = blockIdx.y * rows_per_part;
  const int64_t i1 = i0 + rows_per_part < n ? i0 + rows_per_part : n;
  double* part = partial + blockIdx.y * kp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < kp; e += stride) {
    const int64_t kk = e % k, c = e / k;  // kk fastest: coalesced reads of Q's rows
    double acc = 0.0;
    for (int64_t i = i0; i < i1; ++i) {
      acc += static_cast<double>(Q[i * k + kk]) * static_cast<double>(A[i * p + c]);
    }
    part[kk * p + c] = acc;
  }
}

// partial[part][c] = Σ_{i in part} A[i, c] B[i, c].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    column_dots_partial_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                               double* __restrict__ partial, int64_t n, int64_t p,
                               int64_t rows_per_part) {
  const int64_t i0 = blockIdx.y * rows_per_part;
  const int64_t i1 = i0 + rows_per_part < n ? i0 + rows_per_part : n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = blockIdx.x * int64_t(kThreads) + threadIdx.x; c < p; c += stride) {
    double acc = 0.0;
    for (int64_t i = i0; i < i1; ++i) {
      acc += static_cast<double>(A[i * p + c]) * static_cast<double>(B[i * p + c]);
    }
    partial[blockIdx.y * p + c] = acc;
  }
}

__global__ void __launch_bounds__(kThreads)
    sum_parts_kernel(const double* __restrict__ partial, int64_t parts, int64_t size,
                     double* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < size; e += stride) {
    double acc = 0.0;
    for (int64_t part = 0; part < parts; ++part) acc += partial[part * size + e];
    out[e] = acc;
  }
}

// out = (G − Z diag(s)) / norm column by column; Z may be null.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scale_columns_kernel(const scalar_t* G, const scalar_t* __restrict__ Z,
                         const double* __restrict__ s, const double* __restrict__ norm,
                         scalar_t* out, int64_t n, int64_t p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < n * p; e += stride) {
    const int64_t c = e % p;
    const double z = Z != nullptr ? static_cast<double>(Z[e]) * s[c] : 0.0;
    out[e] = static_cast<scalar_t>((static_cast<double>(G[e]) - z) / norm[c]);
  }
}

// dQ[i, kk] = −Σ_j Σ_c (G_upper[j][i, c] C[j][kk, c] + Ys[j][i, c] D[j][kk, c]).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    grad_Q_kernel(const scalar_t* __restrict__ G_upper, const scalar_t* __restrict__ Ys,
                  const double* __restrict__ C, const double* __restrict__ D,
                  scalar_t* __restrict__ dQ, int64_t passes, int64_t n, int64_t k, int64_t p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < n * k; e += stride) {
    const int64_t i = e / k, kk = e % k;
    double acc = 0.0;
    for (int64_t j = 0; j < passes; ++j) {
      const scalar_t* g = G_upper + (j * n + i) * p;
      const scalar_t* y = Ys + (j * n + i) * p;
      const double* c_row = C + (j * k + kk) * p;
      const double* d_row = D + (j * k + kk) * p;
      for (int64_t c = 0; c < p; ++c) {
        acc += static_cast<double>(g[c]) * c_row[c] + static_cast<double>(y[c]) * d_row[c];
      }
    }
    dQ[e] = static_cast<scalar_t>(-acc);
  }
}

// The launches of one call, on the current stream, over contiguous Q (n, k) and operands
// (n, p).
template <typename scalar_t>
class Launcher {
 public:
  Launcher(const scalar_t* Q, int64_t n, int64_t k, int64_t p, cudaStream_t stream,
           at::TensorOptions f64)
      : Q_(Q), n_(n), k_(k), p_(p), stream_(stream), f64_(f64) {}

  // out = in − Q C (in == out allowed).
  void subtract(const scalar_t* in, const double* C, scalar_t* out) const {
    if (n_ == 0 || p_ == 0) return;
    const int rows_per_block = kThreads / kWarp;
    const int grid = static_cast<int>(std::clamp<int64_t>(ceil_div(n_, rows_per_block), 1,
                                                          std::numeric_limits<int>::max()));
    subtract_kernel<scalar_t><<<grid, kThreads, 0, stream_>>>(Q_, C, in, out, n_, k_, p_);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // gram = Qᵀ A, (k, p) float64.
  void gram(const scalar_t* A, double* gram) const {
    const int64_t kp = k_ * p_;
    if (kp == 0) return;
    if (n_ == 0) {
      C10_CUDA_CHECK(cudaMemsetAsync(gram, 0, kp * sizeof(double), stream_));
      return;
    }
    const int64_t parts = row_parts(n_, kp);
    at::Tensor partial = at::empty({parts, kp}, f64_);
    const dim3 grid(grid_for(kp), static_cast<unsigned>(parts));
    gram_partial_kernel<scalar_t><<<grid, kThreads, 0, stream_>>>(
        Q_, A, partial.mutable_data_ptr<double>(), n_, k_, p_, ceil_div(n_, parts));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_parts(partial, parts, kp, gram);
  }

  // Σ_i A[i, c] B[i, c] for every column, (p,) float64 on the device.
  at::Tensor column_dots(const scalar_t* A, const scalar_t* B) const {
    at::Tensor dots = at::zeros({p_}, f64_);
    if (p_ == 0 || n_ == 0) return dots;
    const int64_t parts = row_parts(n_, p_);
    at::Tensor partial = at::empty({parts, p_}, f64_);
    const dim3 grid(grid_for(p_), static_cast<unsigned>(parts));
    column_dots_partial_kernel<scalar_t><<<grid, kThreads, 0, stream_>>>(
        A, B, partial.mutable_data_ptr<double>(), n_, p_, ceil_div(n_, parts));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_parts(partial, parts, p_, dots.mutable_data_ptr<double>());
    return dots;
  }

  void scale_columns(const scalar_t* G, const scalar_t* Z, const double* s, const double* norm,
                     scalar_t* out) const {
    if (n_ * p_ == 0) return;
    scale_columns_kernel<scalar_t><<<grid_for(n_ * p_), kThreads, 0, stream_>>>(G, Z, s, norm,
                                                                                out, n_, p_);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  void sum_parts(const at::Tensor& partial, int64_t parts, int64_t size, double* out) const {
    sum_parts_kernel<<<grid_for(size), kThreads, 0, stream_>>>(partial.const_data_ptr<double>(),
                                                               parts, size, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const scalar_t* Q_;
  int64_t n_, k_, p_;
  cudaStream_t stream_;
  at::TensorOptions f64_;
};

// The normalization check runs on the device and never synchronizes (a grown layer runs it on
// every forward): a refused column raises a device-side assertion when the stream reaches it.
// It is left out of CUDA graph capture, where an assertion would outlive the call that made it.
bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The CUDA counterpart of check_normalizable (project_out.h): the same test on device tensors.
void assert_normalizable(const at::Tensor& x_sq, const at::Tensor& y_sq, int64_t basis,
                         double eps) {
  const double tol = span_tolerance(basis, eps);
  const at::Tensor ok = (at::isfinite(x_sq) & at::isfinite(y_sq) & (y_sq > x_sq * (tol * tol)))
                            .all();
  at::_assert_async(ok,
                    "lowrank_ext.project_out: a column of argument 'X' is zero, lies in span(Q) "
                    "to working precision or has a non-finite norm; normalize=True refuses it "
                    "(run the same call on the CPU to see which column)");
}

// The CUDA counterpart of the CPU check of norms (check_project_out_backward_args): each > 0 and
// finite, tested on the device without synchronizing.
void assert_positive_norms(const at::Tensor& norms) {
  const at::Tensor ok = ((norms > 0) & at::isfinite(norms)).all();
  at::_assert_async(ok,
                    "lowrank_ext.project_out_backward: an entry of argument 'norms' is <= 0 or "
                    "not finite; the norms of the forward's columns before normalization are > 0 "
                    "and finite (pass the norms project_out_forward returned)");
}

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

ProjectOutResult project_out_forward_cuda(const at::Tensor& Q, const at::Tensor& X,
                                          int64_t passes, bool normalize) {
  const ProjectOutSizes sz = check_project_out_args(Q, X, passes, normalize, at::kCUDA);
  const c10::cuda::CUDAGuard guard(X.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // ATen calls below are internal
  const int64_t n = sz.rows, k = sz.basis, p = sz.columns, kp = k * p;
  const at::Tensor Qc = Q.contiguous(), Xc = X.contiguous();
  const auto f64 = X.options().dtype(at::kDouble);
  at::Tensor Y = at::empty({n, p}, X.options());
  at::Tensor coeffs = at::empty({passes, k, p}, f64);
  at::Tensor norms = at::empty({normalize ? p : 0}, f64);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "lowrank_ext_project_out_forward_cuda", [&] {
    const Launcher<scalar_t> launch(Qc.const_data_ptr<scalar_t>(), n, k, p, stream, f64);
    const scalar_t* x = Xc.const_data_ptr<scalar_t>();
    scalar_t* y = Y.mutable_data_ptr<scalar_t>();
    double* C = coeffs.mutable_data_ptr<double>();
    for (int64_t j = 0; j < passes; ++j) {
      launch.gram(j == 0 ? x : y, C + j * kp);           // C_j = Qᵀ Y_j
      launch.subtract(j == 0 ? x : y, C + j * kp, y);    // Y_{j+1} = Y_j − Q C_j
    }
    if (normalize) {
      const at::Tensor y_sq = launch.column_dots(y, y);
      if (!capturing() && p > 0) {
        assert_normalizable(launch.column_dots(x, x), y_sq, k,
                            std::numeric_limits<scalar_t>::epsilon());
      }
      norms.copy_(y_sq.sqrt());
      launch.scale_columns(y, nullptr, nullptr, norms.const_data_ptr<double>(), y);
    }
  });
  return {Y, coeffs, norms};
}

ProjectOutGrads project_out_backward_cuda(const at::Tensor& grad_Y, const at::Tensor& Q,
                                          const at::Tensor& X, const at::Tensor& Y,
                                          const at::Tensor& coeffs, const at::Tensor& norms,
                                          int64_t passes, bool normalize,
                                          const c10::List<bool>& output_mask) {
  const auto [need_dQ, need_dX] = project_out_output_mask(output_mask);
  const ProjectOutSizes sz = check_project_out_backward_args(grad_Y, Q, X, Y, coeffs, norms,
                                                             passes, normalize, at::kCUDA);
  const c10::cuda::CUDAGuard guard(X.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = sz.rows, k = sz.basis, p = sz.columns, np = n * p, kp = k * p;
  at::Tensor dQ = need_dQ ? at::empty({n, k}, Q.options()) : empty_grad(Q);
  at::Tensor dX = need_dX ? at::empty({n, p}, X.options()) : empty_grad(X);
  if (!need_dQ && !need_dX) return {dQ, dX};

  const at::Tensor Gc = grad_Y.contiguous(), Qc = Q.contiguous(), Xc = X.contiguous();
  const at::Tensor Zc = Y.contiguous(), Cc = coeffs.contiguous(), Nc = norms.contiguous();
  const auto f64 = X.options().dtype(at::kDouble);
  at::Tensor G_upper = at::empty({passes, n, p}, X.options());  // G_1 … G_passes
  at::Tensor D = at::empty({passes, k, p}, f64);                // D_j = Qᵀ G_{j+1}
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "lowrank_ext_project_out_backward_cuda", [&] {
    const Launcher<scalar_t> launch(Qc.const_data_ptr<scalar_t>(), n, k, p, stream, f64);
    scalar_t* upper = G_upper.mutable_data_ptr<scalar_t>();
    auto G = [&](int64_t j) {
      return j == 0 ? dX.mutable_data_ptr<scalar_t>() : upper + (j - 1) * np;
    };
    double* Dp = D.mutable_data_ptr<double>();

    const scalar_t* g = Gc.const_data_ptr<scalar_t>();
    if (normalize) {
      if (!capturing() && p > 0) assert_positive_norms(Nc);
      const scalar_t* z = Zc.const_data_ptr<scalar_t>();
      const at::Tensor s = launch.column_dots(z, g);
      launch.scale_columns(g, z, s.const_data_ptr<double>(), Nc.const_data_ptr<double>(),
                           G(passes));
    } else if (np > 0) {
      C10_CUDA_CHECK(cudaMemcpyAsync(G(passes), g, np * sizeof(scalar_t),
                                     cudaMemcpyDeviceToDevice, stream));
    }
    for (int64_t j = passes - 1; j >= 0; --j) {
      launch.gram(G(j + 1), Dp + j * kp);  // D_j = Qᵀ G_{j+1}
      if (j > 0 || need_dX) launch.subtract(G(j + 1), Dp + j * kp, G(j));
    }
    if (!need_dQ || n * k == 0) {
      if (need_dQ) dQ.zero_();
      return;
    }
    // Y_0 = X, Y_j = Y_{j-1} − Q C_{j-1}: recomputed exactly as the forward did.
    at::Tensor Ys = at::empty({passes, n, p}, X.options());
    scalar_t* ys = Ys.mutable_data_ptr<scalar_t>();
    if (np > 0) {
      C10_CUDA_CHECK(cudaMemcpyAsync(ys, Xc.const_data_ptr<scalar_t>(), np * sizeof(scalar_t),
                                     cudaMemcpyDeviceToDevice, stream));
    }
    for (int64_t j = 1; j < passes; ++j) {
      launch.subtract(ys + (j - 1) * np, Cc.const_data_ptr<double>() + (j - 1) * kp,
                      ys + j * np);
    }
    grad_Q_kernel<scalar_t><<<grid_for(n * k), kThreads, 0, stream>>>(
        upper, ys, Cc.const_data_ptr<double>(), Dp, dQ.mutable_data_ptr<scalar_t>(), passes, n,
        k, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dQ, dX};
}

}  // namespace lowrank_ext

namespace {
at::Tensor project_out_cuda(const at::Tensor& Q, const at::Tensor& X, int64_t passes,
                            bool normalize) {
  return std::get<0>(lowrank_ext::project_out_forward_cuda(Q, X, passes, normalize));
}
}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("project_out", TORCH_FN(project_out_cuda));
  m.impl("project_out_forward", TORCH_FN(lowrank_ext::project_out_forward_cuda));
  m.impl("project_out_backward", TORCH_FN(lowrank_ext::project_out_backward_cuda));
}
