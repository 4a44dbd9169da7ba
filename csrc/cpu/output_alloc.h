// Large output and work tensors of the CPU kernels (y, the saved t, dx, dU, dV, project_out's Y
// and dX: 256 KiB and more; the backward's work memory past 1 MiB).
//
// A fresh buffer of that size comes from mmap, and its first write faults in every 4 KiB page:
// on the 2-core VM of bench/RESULTS.md allocating and filling 64 MiB took ~50 ms, and refilling
// a buffer already mapped ~5 ms, so at B = 4096 the page faults of y and dx cost more than the
// GEMMs that fill them. Freed buffers are therefore kept (per size, up to a byte limit) and
// handed out again, as PyTorch's CUDA caching allocator does on the GPU; new ones of 2 MiB and
// more are 2 MiB aligned and advised for transparent huge pages (Linux), fewer faults and TLB
// entries. From 256 KiB: at B = 1 the 1 MiB dU and dV of a 4096-wide layer at r = 64 came from
// glibc's heap, whose top was trimmed and faulted in again on every call (~300 faults, 3x the
// time of two nn.Linear).
// Huge pages alone were tried and dropped: on a VM that reports free memory to its host
// (virtio-balloon free page reporting) a freed 2 MiB block is taken back, and the next call
// faulted it in from the host again, 3-8x slower than a 4 KiB page run.
//
// LOWRANK_EXT_CPU_CACHE_MB (read once; default 256) limits the bytes kept; a buffer larger than
// the limit, and every buffer at 0 (cache off), comes from torch's allocator.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lowrank_ext::cpu {

// at::empty(sizes, options) for a contiguous CPU tensor: from the cache at 256 KiB and more.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct BufferCacheStats {
  int64_t cached_bytes;  // freed buffers kept now
  int64_t limit_bytes;   // LOWRANK_EXT_CPU_CACHE_MB in bytes
  int64_t hits;          // allocations served from the cache
  int64_t misses;        // allocations that mapped new memory
};

BufferCacheStats buffer_cache_stats();
// Frees every kept buffer (live tensors are untouched).
void empty_buffer_cache();
// Why LOWRANK_EXT_CPU_CACHE_MB was refused, or null.
const char* buffer_cache_config_error();

}  // namespace lowrank_ext::cpu
