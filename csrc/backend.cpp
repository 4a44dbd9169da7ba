// See backend.h.
#include "backend.h"

#include <atomic>

#include "cpu/blas.h"
#include "cpu/output_alloc.h"

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

bool tensorcore_kernels_built() {
#ifdef LOWRANK_EXT_WITH_TENSORCORE
  return true;
#else
  return false;
#endif
}

const char* tensorcore_missing_reason() {
#if defined(LOWRANK_EXT_WITH_TENSORCORE)
  return "";
#elif defined(LOWRANK_EXT_WITH_CUDA)
  return "this CUDA build of lowrank_ext found no CUTLASS headers (pip install "
         "nvidia-cutlass==4.2.0.0 or set CUTLASS_PATH, then rebuild; see README 'CUDA kernels')";
#else
  return "this build of lowrank_ext has no CUDA kernels (built without CUDA)";
#endif
}

const char* cpu_gemm_path() { return cpu::cpu_blas_name(); }
void cpu_buffer_cache_stats(int64_t out[4]) {
  const cpu::BufferCacheStats s = cpu::buffer_cache_stats();
  out[0] = s.cached_bytes;
  out[1] = s.limit_bytes;
  out[2] = s.hits;
  out[3] = s.misses;
}
void empty_cpu_buffer_cache() { cpu::empty_buffer_cache(); }
const char* cpu_buffer_cache_error() { return cpu::buffer_cache_config_error(); }

}  // namespace lowrank_ext
