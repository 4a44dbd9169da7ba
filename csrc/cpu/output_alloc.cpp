#include "cpu/output_alloc.h"

#include <c10/core/Allocator.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <string>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace lowrank_ext::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinCached = size_t{256} << 10;  // below: torch's allocator (glibc's heap)
constexpr size_t kGranule = size_t{64} << 10;     // sizes under 2 MiB are rounded to this

// The size a request of n bytes is served with: blocks of one rounded size are interchangeable.
size_t rounded_size(size_t n) {
  const size_t step = n >= kHugePage ? kHugePage : kGranule;
  return (n + step - 1) / step * step;
}

// The byte limit of LOWRANK_EXT_CPU_CACHE_MB; a bad value leaves the limit at 0 and says why in
// `error` (the Python import raises it: this runs under the C API, where a throw would abort).
int64_t limit_from_environment(std::string& error) {
  const char* v = std::getenv("LOWRANK_EXT_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return int64_t{256} << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0' || mb < 0 || errno != 0 || mb > (int64_t{1} << 40)) {
    error = std::string("LOWRANK_EXT_CPU_CACHE_MB must be a whole number of MiB >= 0, got '") +
            v + "'";
    return 0;
  }
  return static_cast<int64_t>(mb) << 20;
}

struct Block {
  void* p;
  size_t bytes;
};

void* map_new(size_t bytes) {
  void* p = nullptr;
  const bool huge = bytes >= kHugePage;
  if (posix_memalign(&p, huge ? kHugePage : 4096, bytes) != 0) throw std::bad_alloc();
#if defined(__linux__)
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice: where refused, normal pages
#endif
  return p;
}

// Freed blocks by size; the oldest is evicted first when the limit would be passed. Never
// destroyed: tensors freed during interpreter shutdown still return their blocks here.
class BufferCache {
 public:
  static BufferCache& get() {
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second.p;
        free_.erase(it);
        cached_ -= static_cast<int64_t>(bytes);
        ++hits_;
        return p;
      }
      ++misses_;
    }
    return map_new(bytes);
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (static_cast<int64_t>(bytes) <= limit_) {
        while (cached_ + static_cast<int64_t>(bytes) > limit_) evict_oldest_locked();
        free_.emplace(bytes, Kept{p, ++clock_});
        cached_ += static_cast<int64_t>(bytes);
        return;
      }
    }
    std::free(p);
  }

  BufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, limit_, hits_, misses_};
  }

  const std::string& config_error() const { return error_; }
  int64_t limit() const { return limit_; }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    while (!free_.empty()) evict_oldest_locked();
  }

 private:
  struct Kept {
    void* p;
    uint64_t stamp;
  };

  BufferCache() : limit_(limit_from_environment(error_)) {
#if defined(__linux__)
    // A fork while another thread holds the lock would leave it held in the child forever.
    pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); },
                   [] { get().mutex_.unlock(); });
#endif
  }

  void evict_oldest_locked() {
    auto oldest = free_.begin();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second.stamp < oldest->second.stamp) oldest = it;
    }
    std::free(oldest->second.p);
    cached_ -= static_cast<int64_t>(oldest->first);
    free_.erase(oldest);
  }

  std::mutex mutex_;
  std::string error_;  // before limit_: filled by its initializer
  std::multimap<size_t, Kept> free_;
  const int64_t limit_;
  int64_t cached_ = 0, hits_ = 0, misses_ = 0;
  uint64_t clock_ = 0;
};

void release(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  BufferCache::get().give_back(block->p, block->bytes);
  delete block;
}

// Storage allocator of large outputs; a resize goes through it too.
struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, c10::Device(c10::kCPU)};
    const size_t bytes = rounded_size(n);
    void* p = BufferCache::get().take(bytes);
    return {p, new Block{p, bytes}, &release, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes =
      static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  // Cache off, or a buffer it could never keep: torch's allocator, as without this file (not
  // huge pages alone: see the header).
  const int64_t limit = BufferCache::get().limit();
  if (bytes < kMinCached || static_cast<int64_t>(rounded_size(bytes)) > limit) {
    return at::empty(sizes, options);
  }
  static auto* allocator = new CachingAllocator();  // never destroyed, like the cache
  return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

BufferCacheStats buffer_cache_stats() { return BufferCache::get().stats(); }

void empty_buffer_cache() { BufferCache::get().clear(); }

const char* buffer_cache_config_error() {
  const std::string& e = BufferCache::get().config_error();
  return e.empty() ? nullptr : e.c_str();
}

}  // namespace lowrank_ext::cpu
