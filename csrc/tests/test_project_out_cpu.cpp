// The CPU kernel of lowrank_ext::project_out against naive loops in double precision (Gram–
// Schmidt written out one column at a time), called through the dispatcher. Exit code 0 on
// success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <vector>

namespace {

int failures = 0;

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                               const at::Tensor&, int64_t, bool);

// y = x; repeat passes: y -= Σ_k <q_k, y> q_k (all k from the same y); then y /= ‖y‖.
std::vector<double> naive_column(const at::Tensor& Q, const at::Tensor& X, int64_t col,
                                 int64_t passes, bool normalize) {
  const int64_t n = Q.size(0), k = Q.size(1);
  auto q = Q.accessor<double, 2>();
  std::vector<double> y(n);
  for (int64_t i = 0; i < n; ++i) y[i] = X[i][col].item<double>();
  for (int64_t pass = 0; pass < passes; ++pass) {
    std::vector<double> c(k, 0.0);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < n; ++i) c[j] += q[i][j] * y[i];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j) y[i] -= q[i][j] * c[j];
  }
  if (normalize) {
    double norm = 0.0;
    for (double v : y) norm += v * v;
    for (double& v : y) v /= std::sqrt(norm);
  }
  return y;
}

void check(int64_t n, int64_t k, int64_t p, int64_t passes, bool normalize, at::ScalarType dtype) {
  static auto forward = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("lowrank_ext::project_out_forward", "")
                            .typed<Forward>();
  const at::Tensor Q = std::get<0>(at::linalg_qr(at::randn({n, k}, at::kDouble)));
  const at::Tensor X = at::randn({n, p}, at::kDouble);
  const at::Tensor Y = std::get<0>(forward.call(Q.to(dtype), X.to(dtype), passes, normalize));
  const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
  // The naive loops run on the rounded inputs, so only the kernel's own rounding remains.
  const at::Tensor Qr = Q.to(dtype).to(at::kDouble), Xr = X.to(dtype).to(at::kDouble);
  for (int64_t col = 0; col < p; ++col) {
    const std::vector<double> expected = naive_column(Qr, Xr, col, passes, normalize);
    for (int64_t i = 0; i < n; ++i) {
      const double got = Y[i][col].item<double>();
      if (std::abs(got - expected[i]) > tol * (1.0 + std::abs(expected[i]))) {
        std::printf("FAIL n=%lld k=%lld p=%lld passes=%lld normalize=%d %s: Y[%lld][%lld] = %.17g, "
                    "expected %.17g\n",
                    (long long)n, (long long)k, (long long)p, (long long)passes, normalize,
                    c10::toString(dtype), (long long)i, (long long)col, got, expected[i]);
        ++failures;
        return;
      }
    }
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dtype : {at::kDouble, at::kFloat})
    for (bool normalize : {false, true}) {
      check(1, 0, 1, 2, normalize, dtype);     // empty basis
      check(9, 4, 1, normalize ? 2 : 1, normalize, dtype);  // one classical pass (normalize: 2)
      check(37, 11, 3, 2, normalize, dtype);   // odd sizes, CGS2
      check(300, 20, 2, 3, normalize, dtype);  // several row chunks
    }
  std::printf(failures ? "%d check(s) failed\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
