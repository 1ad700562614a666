#include "host_allocator.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace simdev {

// Note [Pinned block lifetime]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A non-blocking copy reads or writes pinned memory from a stream's worker
// after the host has moved on, through a raw pointer. The copy records a
// marker on its stream (record_event, as torch's CUDA copy does) and a freed
// block waits in `pending_` until every such marker is reached; only then can
// a new allocation reuse it. Memory goes back to the system only in
// empty_cache, and only for cached blocks, which no queued copy touches.

namespace {

size_t next_power_of_two(size_t nbytes) {
  size_t power = 1;
  while (power < nbytes) {
    power <<= 1;
  }
  return power;
}

} // namespace

c10::DataPtr HostAllocator::allocate(size_t nbytes) {
  const c10::Device cpu(c10::DeviceType::CPU);
  std::lock_guard<std::mutex> lock(mutex_);
  allocation_calls_ += 1;
  if (fail_countdown_ > 0 && --fail_countdown_ == 0) {
    TORCH_CHECK(
        false,
        "SIMDEV error: out of memory (pinned host allocation of ",
        nbytes,
        " bytes failed, injected by fail_pinned_allocation)");
  }
  if (nbytes == 0) {
    return c10::DataPtr(nullptr, cpu);
  }
  collect_pending();
  const size_t size = next_power_of_two(nbytes);
  Block* block = nullptr;
  auto cached = free_.find(size);
  if (cached != free_.end() && !cached->second.empty()) {
    block = cached->second.back();
    cached->second.pop_back();
  } else {
    TORCH_CHECK(
        !limit_ || held_bytes_ + static_cast<int64_t>(size) <= *limit_,
        "SIMDEV error: out of memory (pinned host allocation of ",
        size,
        " bytes would exceed the pinned limit of ",
        *limit_,
        " bytes, ",
        held_bytes_,
        " held)");
    void* ptr = std::aligned_alloc(4096, std::max<size_t>(size, 4096));
    TORCH_CHECK(ptr != nullptr, "SIMDEV error: out of memory (pinned host allocation of ", size, " bytes)");
    block = new Block{ptr, size, false, {}};
    blocks_[static_cast<const char*>(ptr)] = block;
    held_bytes_ += static_cast<int64_t>(size);
    stats_.allocations.increase(1);
    stats_.allocated_bytes.increase(size);
    stats_.num_host_alloc += 1;
  }
  block->in_use = true;
  stats_.active_requests.increase(1);
  stats_.active_bytes.increase(size);
  return c10::DataPtr(block->ptr, block, &HostAllocator::delete_block, cpu);
}

void HostAllocator::copy_data(void* dest, const void* src, std::size_t count)
    const {
  std::memcpy(dest, src, count);
}

void HostAllocator::delete_block(void* context) {
  host_allocator().release(static_cast<Block*>(context));
}

void HostAllocator::release(Block* block) {
  std::lock_guard<std::mutex> lock(mutex_);
  block->in_use = false;
  stats_.active_requests.decrease(1);
  stats_.active_bytes.decrease(block->size);
  pending_.push_back(block); // See Note [Pinned block lifetime]
  collect_pending();
}

void HostAllocator::collect_pending() {
  auto done = std::stable_partition(
      pending_.begin(), pending_.end(), [](const Block* block) {
        return !std::all_of(
            block->uses.begin(), block->uses.end(), [](const auto& use) {
              return use->stream->reached(use->seq);
            });
      });
  for (auto it = done; it != pending_.end(); ++it) {
    (*it)->uses.clear();
    free_[(*it)->size].push_back(*it);
  }
  pending_.erase(done, pending_.end());
}

bool HostAllocator::record_event(void* ptr, void* context, c10::Stream stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto* block = static_cast<Block*>(context);
  if (block == nullptr || blocks_.count(static_cast<const char*>(block->ptr)) == 0) {
    return false;
  }
  block->uses.push_back(record(stream_of(stream)));
  return true;
}

void HostAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  empty_cache_calls_ += 1;
  collect_pending();
  for (auto& entry : free_) {
    for (Block* block : entry.second) {
      blocks_.erase(static_cast<const char*>(block->ptr));
      std::free(block->ptr);
      held_bytes_ -= static_cast<int64_t>(block->size);
      stats_.allocations.decrease(1);
      stats_.allocated_bytes.decrease(block->size);
      stats_.num_host_free += 1;
      delete block;
    }
  }
  free_.clear();
}

at::HostStats HostAllocator::get_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void HostAllocator::reset_accumulated_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.allocations.reset_accumulated();
  stats_.allocated_bytes.reset_accumulated();
  stats_.active_requests.reset_accumulated();
  stats_.active_bytes.reset_accumulated();
  stats_.num_host_alloc = 0;
  stats_.num_host_free = 0;
}

void HostAllocator::reset_peak_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.allocations.reset_peak();
  stats_.allocated_bytes.reset_peak();
  stats_.active_requests.reset_peak();
  stats_.active_bytes.reset_peak();
}

bool HostAllocator::is_pinned(const void* ptr) {
  const auto* address = static_cast<const char*>(ptr);
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = blocks_.upper_bound(address);
  if (it == blocks_.begin()) {
    return false;
  }
  --it;
  return address < it->first + it->second->size;
}

bool HostAllocator::owns(const c10::DataPtr& data) {
  return data.get_deleter() == &HostAllocator::delete_block;
}

int64_t HostAllocator::allocation_calls() {
  std::lock_guard<std::mutex> lock(mutex_);
  return allocation_calls_;
}

int64_t HostAllocator::empty_cache_calls() {
  std::lock_guard<std::mutex> lock(mutex_);
  return empty_cache_calls_;
}

void HostAllocator::fail_allocation(int64_t nth) {
  TORCH_CHECK(nth >= 1, "fail_pinned_allocation: n must be at least 1, got ", nth);
  std::lock_guard<std::mutex> lock(mutex_);
  fail_countdown_ = nth;
}

void HostAllocator::set_limit(std::optional<int64_t> nbytes) {
  TORCH_CHECK(
      !nbytes || *nbytes >= 0,
      "set_pinned_limit: nbytes must be non-negative or None, got ",
      nbytes.value_or(0));
  std::lock_guard<std::mutex> lock(mutex_);
  limit_ = nbytes;
}

HostAllocator& host_allocator() {
  static auto* allocator = new HostAllocator();
  return *allocator;
}

namespace {
struct Registration {
  Registration() {
    at::setHostAllocator(c10::DeviceType::PrivateUse1, &host_allocator());
  }
} registration;
} // namespace

} // namespace simdev
