#include "pinned_pool.h"

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace gcoffload {

// Note [Host buffer reuse]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// A released buffer may still be the source or destination of a copy queued
// on a side stream: the handle that owned it was fetched (its H2D copy is in
// flight) or dropped right after an offload (its D2H copy is in flight). If
// the buffer went straight back to the free list, the next offload of the same
// size could start writing into it while the old copy still runs. So a release
// carries the fence of the last copy that touches the buffer; the buffer waits
// in `retiring_` and joins the free list only once `collect_retired` sees the
// fence done. Nothing blocks: a training step touches a buffer again only a
// whole forward pass later, long after its copy finished. The same holds for
// trim(): a slab is freed only when none of its buffers is retiring.

namespace {

size_t align_up(size_t nbytes) {
  return (nbytes + PinnedPool::kAlignment - 1) / PinnedPool::kAlignment *
      PinnedPool::kAlignment;
}

size_t next_power_of_two(size_t nbytes) {
  size_t power = 1;
  while (power < nbytes) {
    power <<= 1;
  }
  return power;
}

at::Allocator* host_allocator(c10::DeviceType device_type) {
  if (device_type == c10::DeviceType::CPU) {
    return c10::GetCPUAllocator();
  }
  return at::getHostAllocator(device_type);
}

} // namespace

at::Tensor HostBlock::view(at::ScalarType dtype, at::IntArrayRef sizes) const {
  const size_t itemsize = c10::elementSize(dtype);
  TORCH_INTERNAL_ASSERT(offset % itemsize == 0, "misaligned host block");
  return at::empty({0}, at::TensorOptions().dtype(dtype))
      .set_(slab->storage, static_cast<int64_t>(offset / itemsize), sizes);
}

PinnedPool::PinnedPool(c10::DeviceType device_type)
    : device_type_(device_type) {
  stats_.budget_bytes = -1;
}

PinnedPool::~PinnedPool() = default;

std::optional<HostBlock> PinnedPool::acquire(size_t nbytes) {
  TORCH_INTERNAL_ASSERT(nbytes > 0, "acquire of an empty buffer");
  const size_t size = align_up(nbytes);
  std::optional<HostBlock> block;
  size_t trimmed = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    collect_retired();
    block = take_free(size);
    if (!block) {
      block = carve(size);
    }
    if (!block) {
      auto capacity = new_slab_capacity(size);
      if (!capacity) {
        trimmed = trim_locked();
        capacity = new_slab_capacity(size);
      }
      if (capacity) {
        add_slab(*capacity);
        block = carve(size);
      }
    }
    if (block) {
      stats_.in_use_bytes += static_cast<int64_t>(block->nbytes);
      stats_.peak_in_use_bytes =
          std::max(stats_.peak_in_use_bytes, stats_.in_use_bytes);
    } else {
      stats_.spills += 1;
    }
  }
  if (trimmed > 0) {
    release_to_system();
  }
  return block;
}

std::optional<HostBlock> PinnedPool::take_free(size_t nbytes) {
  // Exact size first; else the smallest free buffer at most 1/kReuseSlack
  // larger, so that shapes varying a little (dynamic padding) still reuse.
  const size_t largest = nbytes + nbytes / kReuseSlack;
  for (auto it = free_.lower_bound(nbytes);
       it != free_.end() && it->first <= largest;) {
    if (it->second.empty()) {
      it = free_.erase(it);
      continue;
    }
    HostBlock block = std::move(it->second.back());
    it->second.pop_back();
    block.slab->live += 1;
    stats_.reuse_hits += 1;
    return block;
  }
  return std::nullopt;
}

std::optional<size_t> PinnedPool::new_slab_capacity(size_t nbytes) const {
  // Always a power of two: torch's host allocator rounds other sizes up, and
  // the budget would no longer count what is really pinned.
  const size_t reserved = static_cast<size_t>(stats_.reserved_bytes);
  const size_t smallest = next_power_of_two(nbytes);
  for (size_t capacity : {std::max(slab_bytes_, smallest), smallest}) {
    if (reserved + capacity <= budget_) {
      return capacity;
    }
  }
  return std::nullopt;
}

void PinnedPool::release_to_system() {
  // Torch's host allocator caches what the pool frees; empty it so the memory
  // goes back to the OS. It holds other users' unused pinned blocks too.
  if (device_type_ != c10::DeviceType::CPU) {
    at::getHostAllocator(device_type_)->empty_cache();
  }
}

void PinnedPool::release(HostBlock block, Fence last_use) {
  std::lock_guard<std::mutex> lock(mutex_);
  retiring_.emplace_back(std::move(block), std::move(last_use));
  collect_retired();
}

void PinnedPool::collect_retired() {
  auto still_busy = std::stable_partition(
      retiring_.begin(), retiring_.end(), [](const auto& entry) {
        return !entry.second.done();
      });
  for (auto it = still_busy; it != retiring_.end(); ++it) {
    HostBlock& block = it->first;
    block.slab->live -= 1;
    stats_.in_use_bytes -= static_cast<int64_t>(block.nbytes);
    free_[block.nbytes].push_back(std::move(block));
  }
  retiring_.erase(still_busy, retiring_.end());
}

std::optional<HostBlock> PinnedPool::carve(size_t nbytes) {
  for (auto it = slabs_.rbegin(); it != slabs_.rend(); ++it) {
    Slab& slab = **it;
    if (slab.capacity - slab.carved >= nbytes) {
      HostBlock block{*it, slab.carved, nbytes};
      slab.carved += nbytes;
      slab.live += 1;
      return block;
    }
  }
  return std::nullopt;
}

void PinnedPool::add_slab(size_t capacity) {
  at::DataPtr data;
  try {
    data = host_allocator(device_type_)->allocate(capacity);
  } catch (const c10::Error& error) {
    TORCH_CHECK(
        false,
        "gcoffload: could not allocate a host slab of ",
        capacity,
        " bytes for ",
        device_type_,
        " offloads (",
        error.what_without_backtrace(),
        "). Lower the host budget with gcoffload.configure(host_budget_bytes=...) "
        "or free host memory.");
  }
  auto slab = std::make_shared<Slab>();
  slab->storage = c10::Storage(
      c10::Storage::use_byte_size_t(),
      capacity,
      std::move(data),
      /*allocator=*/nullptr,
      /*resizable=*/false);
  slab->capacity = capacity;
  slabs_.push_back(std::move(slab));
  stats_.reserved_bytes += static_cast<int64_t>(capacity);
  stats_.host_alloc_calls += 1;
  stats_.slabs = static_cast<int64_t>(slabs_.size());
}

void PinnedPool::reserve(size_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t carvable = 0;
  for (const auto& slab : slabs_) {
    carvable += slab->capacity - slab->carved;
  }
  if (carvable >= nbytes) {
    return;
  }
  const size_t capacity =
      std::max(slab_bytes_, next_power_of_two(nbytes - carvable));
  TORCH_CHECK(
      static_cast<size_t>(stats_.reserved_bytes) + capacity <= budget_,
      "reserve(nbytes=",
      nbytes,
      ") needs a slab of ",
      capacity,
      " bytes, which would exceed the host budget of ",
      budget_,
      " bytes; raise it with gcoffload.configure(host_budget_bytes=...)");
  add_slab(capacity);
}

size_t PinnedPool::trim() {
  size_t freed = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    collect_retired();
    freed = trim_locked();
  }
  if (freed > 0) {
    release_to_system();
  }
  return freed;
}

size_t PinnedPool::trim_locked() {
  size_t freed = 0;
  auto unused = std::stable_partition(
      slabs_.begin(), slabs_.end(), [](const auto& slab) {
        return slab->live > 0;
      });
  for (auto it = unused; it != slabs_.end(); ++it) {
    const Slab* slab = it->get();
    for (auto& entry : free_) {
      auto& blocks = entry.second;
      blocks.erase(
          std::remove_if(
              blocks.begin(),
              blocks.end(),
              [slab](const HostBlock& block) {
                return block.slab.get() == slab;
              }),
          blocks.end());
    }
    freed += slab->capacity;
  }
  slabs_.erase(unused, slabs_.end());
  stats_.reserved_bytes -= static_cast<int64_t>(freed);
  stats_.slabs = static_cast<int64_t>(slabs_.size());
  return freed;
}

void PinnedPool::set_budget(size_t nbytes) {
  bool over_budget = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    budget_ = nbytes;
    stats_.budget_bytes =
        nbytes == kUnlimited ? -1 : static_cast<int64_t>(nbytes);
    over_budget = static_cast<size_t>(stats_.reserved_bytes) > budget_;
  }
  // A lowered budget gives back what it can at once; slabs in use stay.
  if (over_budget) {
    trim();
  }
}

void PinnedPool::set_slab_bytes(size_t nbytes) {
  TORCH_CHECK(
      nbytes >= kAlignment && (nbytes & (nbytes - 1)) == 0,
      "slab_bytes must be a power of two of at least ",
      kAlignment,
      " bytes, got ",
      nbytes);
  std::lock_guard<std::mutex> lock(mutex_);
  slab_bytes_ = nbytes;
}

PoolStats PinnedPool::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  collect_retired();
  return stats_;
}

void PinnedPool::reset_peak() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.peak_in_use_bytes = stats_.in_use_bytes;
}

} // namespace gcoffload
