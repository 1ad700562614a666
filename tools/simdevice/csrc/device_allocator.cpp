#include "device_allocator.h"

#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>

namespace simdev {

// Note [Poison in stream order]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// CUDA's caching allocator hands a freed block to the next allocation on the
// same stream at once: stream order makes that safe for the owning stream
// only. To make a missing cross-stream wait visible, the free queues a job on
// the owning stream that fills the block with 0xFF. Kernels queued on the
// owning stream before the free still see the data; kernels queued after it
// (the next owner) see the poison until they write. A copy on another stream
// that was not made to wait for the owner's work reads poison or the next
// owner's data, never what it meant to read. Fresh blocks start poisoned too.

// Note [record_stream]
// ~~~~~~~~~~~~~~~~~~~~
// `record_stream(s)` says another stream `s` uses the block. At free time a
// marker is recorded on each such stream; the block stays out of the free
// list (and unpoisoned) until all markers are reached, then it is poisoned on
// its owning stream and becomes reusable. Until then it only counts as
// reserved, not allocated, as on CUDA. Pending blocks are collected when
// their device next allocates and in `empty_cache`.

struct DeviceAllocator::Block {
  void* ptr;
  size_t size;
  c10::DeviceIndex device;
  c10::StreamId stream;
  std::vector<c10::StreamId> used_by; // other streams, from record_stream
};

namespace {

size_t round_up(size_t nbytes) {
  return (nbytes + DeviceAllocator::kRounding - 1) / DeviceAllocator::kRounding *
      DeviceAllocator::kRounding;
}

// The statistics this allocator maintains.
std::array<c10::CachingAllocator::Stat*, 4> kept_stats(c10::CachingDeviceAllocator::DeviceStats& stats) {
  return {
      &stats.allocated_bytes[kAggregateStat],
      &stats.reserved_bytes[kAggregateStat],
      &stats.allocation[kAggregateStat],
      &stats.segment[kAggregateStat]};
}

void poison(Stream& stream, void* ptr, size_t size) {
  stream.enqueue([ptr, size] { std::memset(ptr, DeviceAllocator::kPoison, size); });
}

} // namespace

DeviceAllocator::DeviceState& DeviceAllocator::state(c10::DeviceIndex device) {
  check_device(device);
  return states_[device];
}

c10::DataPtr DeviceAllocator::allocate(size_t nbytes) {
  const c10::DeviceIndex device = current_device();
  const c10::Device where(c10::DeviceType::PrivateUse1, device);
  if (nbytes == 0) {
    return c10::DataPtr(nullptr, where);
  }
  const size_t size = round_up(nbytes);
  const c10::StreamId owner = current_stream(device).id();
  DeviceState& st = state(device);
  Block* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(st.mutex);
    collect_pending(st);
    auto it = st.free.find({owner, size});
    if (it != st.free.end() && !it->second.empty()) {
      block = it->second.back();
      it->second.pop_back();
    }
    if (block == nullptr) {
      void* ptr = std::aligned_alloc(kRounding, size);
      TORCH_CHECK_WITH(
          OutOfMemoryError,
          ptr != nullptr,
          "simdev: out of memory allocating ",
          size,
          " bytes on ",
          where);
      std::memset(ptr, kPoison, size); // See Note [Poison in stream order]
      block = new Block{ptr, size, device, owner, {}};
      st.stats.reserved_bytes[kAggregateStat].increase(size);
      st.stats.segment[kAggregateStat].increase(1);
    }
    st.stats.allocated_bytes[kAggregateStat].increase(size);
    st.stats.allocation[kAggregateStat].increase(1);
  }
  return c10::DataPtr(block->ptr, block, &DeviceAllocator::delete_block, where);
}

void DeviceAllocator::delete_block(void* context) {
  device_allocator().release(static_cast<Block*>(context));
}

void DeviceAllocator::release(Block* block) {
  DeviceState& st = state(block->device);
  std::lock_guard<std::mutex> lock(st.mutex);
  st.stats.allocated_bytes[kAggregateStat].decrease(block->size);
  st.stats.allocation[kAggregateStat].decrease(1);
  if (block->used_by.empty()) {
    make_reusable(st, block);
    return;
  }
  // See Note [record_stream].
  Pending pending{block, {}};
  for (c10::StreamId id : block->used_by) {
    pending.uses.push_back(record(stream_of(block->device, id)));
  }
  block->used_by.clear();
  st.pending.push_back(std::move(pending));
}

void DeviceAllocator::make_reusable(DeviceState& st, Block* block) {
  poison(stream_of(block->device, block->stream), block->ptr, block->size);
  st.free[{block->stream, block->size}].push_back(block);
}

void DeviceAllocator::collect_pending(DeviceState& st) {
  auto done = std::stable_partition(
      st.pending.begin(), st.pending.end(), [](const Pending& pending) {
        return !std::all_of(
            pending.uses.begin(), pending.uses.end(), [](const auto& use) {
              return use->stream->reached(use->seq);
            });
      });
  for (auto it = done; it != st.pending.end(); ++it) {
    make_reusable(st, it->block);
  }
  st.pending.erase(done, st.pending.end());
}

void DeviceAllocator::copy_data(void* dest, const void* src, std::size_t count)
    const {
  current_stream().enqueue([dest, src, count] { std::memcpy(dest, src, count); });
}

void DeviceAllocator::recordStream(const c10::DataPtr& data, c10::Stream stream) {
  if (data.get() == nullptr) {
    return;
  }
  TORCH_CHECK(
      data.get_deleter() == &DeviceAllocator::delete_block,
      "simdev: record_stream on memory this allocator did not allocate");
  auto* block = static_cast<Block*>(data.get_context());
  const c10::StreamId id = stream_of(stream).id();
  std::lock_guard<std::mutex> lock(state(block->device).mutex);
  if (id != block->stream &&
      std::find(block->used_by.begin(), block->used_by.end(), id) ==
          block->used_by.end()) {
    block->used_by.push_back(id);
  }
}

void DeviceAllocator::emptyCache(c10::MempoolId_t /*pool*/) {
  for (c10::DeviceIndex device = 0; device < kDeviceCount; ++device) {
    DeviceState& st = states_[device];
    {
      std::lock_guard<std::mutex> lock(st.mutex);
      collect_pending(st);
    }
    // Every job that could touch a cached block, poison included, is queued
    // by now (test code frees nothing concurrently with empty_cache).
    synchronize_device(device);
    std::lock_guard<std::mutex> lock(st.mutex);
    for (auto& entry : st.free) {
      for (Block* block : entry.second) {
        std::free(block->ptr);
        st.stats.reserved_bytes[kAggregateStat].decrease(block->size);
        st.stats.segment[kAggregateStat].decrease(1);
        delete block;
      }
    }
    st.free.clear();
  }
}

c10::CachingDeviceAllocator::DeviceStats DeviceAllocator::getDeviceStats(c10::DeviceIndex device) {
  DeviceState& st = state(resolve(device));
  std::lock_guard<std::mutex> lock(st.mutex);
  return st.stats;
}

void DeviceAllocator::resetAccumulatedStats(c10::DeviceIndex device) {
  DeviceState& st = state(resolve(device));
  std::lock_guard<std::mutex> lock(st.mutex);
  for (auto* stat : kept_stats(st.stats)) {
    stat->reset_accumulated();
  }
}

void DeviceAllocator::resetPeakStats(c10::DeviceIndex device) {
  DeviceState& st = state(resolve(device));
  std::lock_guard<std::mutex> lock(st.mutex);
  for (auto* stat : kept_stats(st.stats)) {
    stat->reset_peak();
  }
}

DeviceAllocator& device_allocator() {
  static auto* allocator = new DeviceAllocator();
  return *allocator;
}

void resize_storage(const c10::Storage& storage, size_t nbytes) {
  c10::DeviceGuard guard(storage.device());
  c10::DataPtr grown = device_allocator().allocate(nbytes);
  const size_t kept = std::min(nbytes, storage.nbytes());
  if (kept > 0) {
    device_allocator().copy_data(grown.get(), storage.data(), kept);
  }
  // Dropping the old block queues its poison on its owner: behind the copy
  // when that is the current stream (as with CUDA's resize, another owner
  // would need record_stream).
  storage.unsafeGetStorageImpl()->set_data_ptr(std::move(grown));
  storage.unsafeGetStorageImpl()->set_nbytes(nbytes);
}

namespace {
struct Registration {
  Registration() {
    c10::SetAllocator(c10::DeviceType::PrivateUse1, &device_allocator());
  }
} registration;
} // namespace

} // namespace simdev
