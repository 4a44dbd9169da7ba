// Which CUDA kernels lowrank_ext::linear runs: a process-wide switch, read on every call.
#pragma once

#include <cstdint>

namespace lowrank_ext {

enum class CudaKernels : int {
  kCublas = 0,  // default: cuBLAS GEMMs composed inside the op (tensor cores, every arch)
  kFused = 1,   // the SIMT fused kernels of cuda/linear.cu (opt-in; no tensor cores)
  kTensorcore = 2,  // forward on the mma.sync kernel of cuda/linear_tensorcore.cu (opt-in),
                    // what it does not take (and every backward) on kCublas
};

// Whether this build holds the tensor-core kernels (a CUDA build that found CUTLASS headers).
bool tensorcore_kernels_built();
// Why not, in words, when tensorcore_kernels_built() is false.
const char* tensorcore_missing_reason();

CudaKernels cuda_kernels();
void set_cuda_kernels(CudaKernels kernels);

// Name of the CPU GEMM path: "blas" (the BLAS inside libtorch, called directly) or "aten".
const char* cpu_gemm_path();
// The CPU kernels' cache of large output buffers (cpu/output_alloc.h): cached bytes, limit in
// bytes, hits, misses; and a call that frees every cached buffer.
void cpu_buffer_cache_stats(int64_t out[4]);
void empty_cpu_buffer_cache();
// Why LOWRANK_EXT_CPU_CACHE_MB was refused, or null.
const char* cpu_buffer_cache_error();

}  // namespace lowrank_ext
