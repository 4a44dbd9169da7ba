// Output and large work tensors of the CPU kernels (y, t, dx, dU, dV, project_out's Y and dX).
//
// A fresh buffer of many MiB comes from mmap on every call, and its first write faults in each
// 4 KiB page: on the 2-core EPYC of bench/RESULTS.md a 64 MiB y or dx cost ~25 ms of page faults,
// more than the GEMMs that fill it at r ≤ 64. Buffers of 2 MiB and more are therefore aligned to
// 2 MiB and advised for transparent huge pages (Linux), which is what torch's own CPU allocator
// does when THP_MEM_ALLOC_ENABLE=1 is set. LOWRANK_EXT_HUGEPAGES=0 (read once) turns it off.
#pragma once

#include <ATen/ATen.h>

namespace lowrank_ext::cpu {

// at::empty(sizes, options) for a CPU tensor, contiguous; large buffers as described above.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Whether large outputs are huge-page advised in this process (false off Linux or when disabled).
bool hugepage_outputs();

}  // namespace lowrank_ext::cpu
