// The CPU kernels of lowrank_ext::linear against naive triple loops in double precision,
// called through the dispatcher as Python would call them. Exit code 0 on success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <vector>

namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// y[b][o] = Σ_i Σ_j Σ_k U[o][i] S[i][j] V[k][j] x[b][k] + bias[o]
at::Tensor naive_forward(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                         const at::Tensor& V, const at::Tensor& bias) {
  const int64_t B = x.size(0), n = x.size(1), m = U.size(0), r = U.size(1);
  auto y = at::zeros({B, m}, x.options());
  auto xa = x.accessor<double, 2>(), Ua = U.accessor<double, 2>(), Va = V.accessor<double, 2>();
  auto ya = y.accessor<double, 2>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t o = 0; o < m; ++o) {
      double sum = bias.defined() ? bias[o].item<double>() : 0.0;
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < r; ++j) {
          const double s = S.dim() == 1 ? (i == j ? S[i].item<double>() : 0.0)
                                        : S[i][j].item<double>();
          if (s == 0.0) continue;
          double xv = 0.0;
          for (int64_t k = 0; k < n; ++k) xv += Va[k][j] * xa[b][k];
          sum += Ua[o][i] * s * xv;
        }
      ya[b][o] = sum;
    }
  return y;
}

// Gradients by central differences would be slow; use the closed forms written as loops.
Grads naive_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& U,
                     const at::Tensor& S, const at::Tensor& V) {
  const at::Tensor core = S.dim() == 1 ? at::diag(S) : S;
  const int64_t B = x.size(0), n = x.size(1), m = U.size(0), r = U.size(1);
  auto t = at::zeros({B, r}, x.options()), g = at::zeros({B, r}, x.options());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < r; ++j) {
      double tv = 0.0, gv = 0.0;
      for (int64_t k = 0; k < n; ++k) tv += x[b][k].item<double>() * V[k][j].item<double>();
      for (int64_t o = 0; o < m; ++o) gv += dy[b][o].item<double>() * U[o][j].item<double>();
      t[b][j] = tv;
      g[b][j] = gv;
    }
  auto dx = at::zeros_like(x), dU = at::zeros_like(U), dcore = at::zeros_like(core);
  auto dV = at::zeros_like(V), dbias = at::zeros({m}, x.options());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t o = 0; o < m; ++o) dbias[o] += dy[b][o];
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) {
        const double c = core[i][j].item<double>();
        dcore[i][j] += g[b][i] * t[b][j];
        for (int64_t o = 0; o < m; ++o) dU[o][i] += dy[b][o] * c * t[b][j];
        for (int64_t k = 0; k < n; ++k) {
          dV[k][j] += x[b][k] * g[b][i] * c;
          dx[b][k] += g[b][i] * c * V[k][j];
        }
      }
  }
  return {dx, dU, S.dim() == 1 ? at::diagonal(dcore).clone() : dcore, dV, dbias};
}

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, const char* what) {
  const double err = got.numel() ? (got.to(at::kDouble) - want).abs().max().item<double>() : 0.0;
  const double tol = got.scalar_type() == at::kDouble ? 1e-10 : 1e-4;
  if (!got.sizes().equals(want.sizes()) || !(err <= tol)) {
    std::printf("FAIL %s: max error %g (tolerance %g)\n", what, err, tol);
    ++failures;
  }
}

void check(int64_t B, int64_t n, int64_t m, int64_t r, bool full_core, at::ScalarType dtype) {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = at::randn({B, n}, opts), U = at::randn({m, r}, opts) / std::sqrt(double(r));
  auto V = at::randn({n, r}, opts) / std::sqrt(double(n)), bias = at::randn({m}, opts);
  auto S = full_core ? at::randn({r, r}, opts) / std::sqrt(double(r)) : at::randn({r}, opts);
  auto dy = at::randn({B, m}, opts);
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("lowrank_ext::linear_forward", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  static auto backward = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lowrank_ext::linear_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const c10::List<bool>&)>();
  auto cast = [&](const at::Tensor& t) { return t.to(dtype); };
  auto [y, t] = forward.call(cast(x), cast(U), cast(S), cast(V), cast(bias), true);
  expect_close(y, naive_forward(x, U, S, V, bias), "forward y");
  expect_close(t, at::mm(x, V), "forward t");
  auto got = backward.call(cast(dy), cast(x), t, cast(U), cast(S), cast(V),
                           c10::List<bool>({true, true, true, true, true}));
  auto want = naive_backward(dy, x, U, S, V);
  expect_close(std::get<0>(got), std::get<0>(want), "grad_x");
  expect_close(std::get<1>(got), std::get<1>(want), "grad_U");
  expect_close(std::get<2>(got), std::get<2>(want), "grad_S");
  expect_close(std::get<3>(got), std::get<3>(want), "grad_V");
  expect_close(std::get<4>(got), std::get<4>(want), "grad_bias");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dtype : {at::kDouble, at::kFloat})
    for (bool full : {false, true}) {
      check(0, 5, 4, 2, full, dtype);     // empty batch
      check(1, 1, 1, 1, full, dtype);     // smallest
      check(7, 13, 11, 3, full, dtype);   // odd sizes
      check(150, 9, 6, 5, full, dtype);   // several row blocks; batch >= out: S folded into U
      check(3, 8, 40, 4, full, dtype);    // batch < out: a full S is applied to t instead
    }
  std::printf(failures ? "%d check(s) failed\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
