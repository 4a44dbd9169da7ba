// See backend.h.
#include "backend.h"

#include <atomic>

#include "cpu/blas.h"

namespace lowrank_ext {
namespace {
std::atomic<int> g_cuda_kernels{static_cast<int>(CudaKernels::kCublas)};
}  // namespace

CudaKernels cuda_kernels() {
  return static_cast<CudaKernels>(g_cuda_kernels.load(std::memory_order_relaxed));
}

void set_cuda_kernels(CudaKernels kernels) {
  g_cuda_kernels.store(static_cast<int>(kernels), std::memory_order_relaxed);
}

const char* cpu_gemm_path() { return cpu::cpu_blas_name(); }

}  // namespace lowrank_ext
