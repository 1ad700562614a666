#pragma once

#include "stream.h"

#include <ATen/core/CachingHostAllocator.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace simdev {

// "Pinned" host memory for simdev: what at::getHostAllocator(PrivateUse1) and
// `pin_memory=True` return, and the only host memory simdev copies
// asynchronously (see copies.cpp). Like torch's caching host allocator it
// rounds sizes up to a power of two, caches freed blocks, and keeps a freed
// block out of the cache until the copies recorded on it (record_event) have
// finished. Tests can count calls, make an allocation fail, and cap the total
// like a host with little pinnable memory.
class HostAllocator final : public at::HostAllocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override;
  void copy_data(void* dest, const void* src, std::size_t count) const override;

  bool record_event(void* ptr, void* context, c10::Stream stream) override;
  void empty_cache() override;
  at::HostStats get_stats() override;
  void reset_accumulated_stats() override;
  void reset_peak_stats() override;

  // True for any address inside a block this allocator handed out.
  bool is_pinned(const void* ptr);
  // True if `data` is (a whole block of) this allocator's memory.
  static bool owns(const c10::DataPtr& data);

  int64_t allocation_calls();
  int64_t empty_cache_calls();
  // Makes the `nth` call to allocate from now (1 = the next) throw.
  void fail_allocation(int64_t nth);
  // Caps the bytes held (in use and cached); nullopt removes the cap.
  void set_limit(std::optional<int64_t> nbytes);

 private:
  struct Block {
    void* ptr;
    size_t size;
    bool in_use;
    std::vector<std::shared_ptr<Recording>> uses;
  };

  static void delete_block(void* context);
  void release(Block* block);
  void collect_pending();

  std::mutex mutex_;
  std::map<const char*, Block*> blocks_; // by address, for is_pinned
  std::map<size_t, std::vector<Block*>> free_;
  std::vector<Block*> pending_; // freed, copies still running
  at::HostStats stats_;
  int64_t allocation_calls_ = 0;
  int64_t empty_cache_calls_ = 0;
  int64_t fail_countdown_ = 0;
  std::optional<int64_t> limit_;
  int64_t held_bytes_ = 0;
};

HostAllocator& host_allocator();

} // namespace simdev
