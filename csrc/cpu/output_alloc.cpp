#include "cpu/output_alloc.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lowrank_ext::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

bool enabled_by_environment() {
  const char* v = std::getenv("LOWRANK_EXT_HUGEPAGES");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

void free_aligned(void* p) { std::free(p); }

// 2 MiB-aligned memory advised for huge pages; the same free() releases it whatever its size,
// so the storage stays resizable through this allocator.
struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n == 0) return {nullptr, nullptr, &free_aligned, c10::Device(c10::kCPU)};
    const size_t rounded = (n + kHugePage - 1) / kHugePage * kHugePage;
    if (posix_memalign(&p, kHugePage, rounded) != 0) throw std::bad_alloc();
#if defined(__linux__)
    madvise(p, rounded, MADV_HUGEPAGE);  // advice only: refused advice leaves normal pages
#endif
    return {p, p, &free_aligned, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_aligned; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

bool hugepage_outputs() {
#if defined(__linux__)
  static const bool on = enabled_by_environment();
  return on;
#else
  return false;
#endif
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (!hugepage_outputs() || bytes < kHugePage) return at::empty(sizes, options);
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

}  // namespace lowrank_ext::cpu
