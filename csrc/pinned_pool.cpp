#include "pinned_pool.h"

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <iterator>
#include <new>

namespace gcoffload {

// Note [Host buffer reuse]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// A released buffer may still be the source or destination of a copy queued
// on a side stream: the handle that owned it was fetched (its H2D copy is in
// flight) or dropped right after an offload (its D2H copy is in flight). If
// its bytes went straight back to the free ranges, the next offload could
// start writing into them while the old copy still runs. So a release carries
// the fence of the last copy that touches the buffer; the buffer waits in
// `retiring_` and rejoins its slab's free ranges only once `collect_retired`
// sees the fence done. Nothing blocks: a training step touches a buffer again
// only a whole forward pass later, long after its copy finished. A slab is
// given back only when all its bytes are free ranges, so never while one of
// its buffers is retiring.

// Note [Slab sizes]
// ~~~~~~~~~~~~~~~~~
// Pinning is slow and pinned memory cannot be swapped, so the pool pins in a
// few large slabs, but only as much as the demand calls for: when no free
// range holds a request, the new slab doubles what the pool holds (at least
// kMinSlabBytes, at most slab_bytes) and is never smaller than the request.
// A few MiB of demand therefore pins a few MiB, not a 256 MiB slab, and a
// demand that keeps rising takes a logarithmic number of allocations. Slabs
// are powers of two because torch's host allocator rounds every request up to
// one: any other size would pin more than the budget counts.
// A request that no free range holds makes every smaller slab "outgrown":
// such a slab can never hold it (rising sequence lengths leave small slabs
// behind). Outgrown slabs are given back once entirely free, so they do not
// pile up, and under a tight budget they make room for a slab that fits.

// Note [Giving host memory back]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Only the pool's own slabs ever leave it, by dropping the pool's reference.
// For the CPU that frees the memory. A device's host allocator (CUDA's
// CachingHostAllocator) caches the block instead: it stays pinned and serves
// the process's next pinned allocation of the same power-of-two size (the
// pool's own next slab of that size, a DataLoader's pinned batch, a
// non-blocking copy to the host). Unpinning it takes the allocator's
// empty_cache, which unpins every unused cached block of the process, not
// only ours, and can synchronise the device. The pool therefore never calls
// it; `torch.accelerator.empty_host_cache()` is for the user to call where a
// stall does not matter (say, after `trim()` at the end of training).
// When slabs go:
//  * acquire (the hot path of every offload) never gives memory back: it
//    takes a free range, pins a new slab within the budget, or refuses (the
//    engine then applies over_budget). Entirely free slabs too small for the
//    request do not count against the budget there: they are outgrown and go
//    at the next release, so the pool can hold more than its budget until
//    then, by no more than those slabs.
//  * release (and stats) give back, once entirely free, slabs that are
//    outgrown (Note [Slab sizes]) and, while the pool holds more than its
//    budget, any other slab: a lowered budget takes effect as buffers return.
//  * set_budget gives back entirely free slabs at once, down to the budget.
//  * trim() gives back every entirely free slab.
// Dropping a slab is cheap (a free, or a lock and an event record in torch's
// cache; unless PYTORCH_CUDA_ALLOC_CONF sets pinned_max_cached_size below the
// slab, when torch frees it at once) and runs after the pool's lock is
// released.

// Note [Failed host allocations]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Pinned memory is capped on many hosts (WSL2 at about 1-2 GiB, containers at
// their locked-memory limit), and a refused allocation is a normal event, not
// a reason to fail the step. The pool then tries smaller slabs, down to the
// power of two the request needs, and if none can be had refuses the request,
// so that the engine follows over_budget (keep, pageable or error). It warns
// once, saying what to set. It also remembers the smallest size refused and
// does not try that size (or a larger one) again until trim() or set_budget
// (every gcoffload.configure call), so a capped host does not pay a failing
// allocation on every offload.

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

// The largest power of two not above `nbytes`, 0 for 0.
size_t previous_power_of_two(size_t nbytes) {
  size_t power = 1;
  while (nbytes > 0 && power <= nbytes / 2) {
    power <<= 1;
  }
  return nbytes == 0 ? 0 : power;
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
  std::string failure;
  bool warn = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    collect_retired();
    block = take_free(size);
    if (block) {
      stats_.reuse_hits += 1;
    } else if (grow(size, failure)) {
      block = take_free(size);
    }
    if (block) {
      stats_.in_use_bytes += static_cast<int64_t>(block->nbytes);
      stats_.peak_in_use_bytes =
          std::max(stats_.peak_in_use_bytes, stats_.in_use_bytes);
    } else {
      stats_.spills += 1;
      warn = !failure.empty() && !warned_failure_;
      warned_failure_ = warned_failure_ || warn;
    }
  }
  if (warn) {
    // See Note [Failed host allocations].
    TORCH_WARN(
        "gcoffload: the host refused page-locked memory for a ",
        nbytes,
        "-byte offload of a ",
        device_type_,
        " tensor (",
        failure,
        "). Hosts cap pinned memory (WSL2 at about 1-2 GiB, containers and "
        "`ulimit -l` at the locked-memory limit). Offloads that find no room "
        "now follow over_budget ('keep' leaves them on the device). Set "
        "gcoffload.configure(host_budget_bytes=...) below the cap, or raise "
        "the cap. This warning is shown once.");
  }
  return block;
}

std::optional<HostBlock> PinnedPool::take_free(size_t nbytes) {
  // Best fit: the shortest free range that holds the request.
  auto best = free_by_size_.lower_bound(FreeRange{nbytes, 0, 0, nullptr});
  if (best == free_by_size_.end()) {
    return std::nullopt;
  }
  const FreeRange range = *best;
  Slab& slab = *range.slab;
  erase_range(slab, slab.free_ranges.find(range.offset));
  if (range.length > nbytes) {
    insert_range(slab, range.offset + nbytes, range.length - nbytes);
  }
  return HostBlock{slab.shared_from_this(), range.offset, nbytes};
}

void PinnedPool::insert_range(Slab& slab, size_t offset, size_t length) {
  slab.free_ranges.emplace(offset, length);
  slab.free_bytes += length;
  free_by_size_.insert(FreeRange{length, slab.id, offset, &slab});
}

void PinnedPool::erase_range(
    Slab& slab,
    std::map<size_t, size_t>::iterator range) {
  free_by_size_.erase(FreeRange{range->second, slab.id, range->first, &slab});
  slab.free_bytes -= range->second;
  slab.free_ranges.erase(range);
}

void PinnedPool::give_back(Slab& slab, size_t offset, size_t length) {
  // Merge with the free neighbours on both sides, so that an entirely free
  // slab is one range again and serves any request up to its capacity.
  auto next = slab.free_ranges.lower_bound(offset);
  if (next != slab.free_ranges.begin()) {
    auto previous = std::prev(next);
    if (previous->first + previous->second == offset) {
      offset = previous->first;
      length += previous->second;
      erase_range(slab, previous);
    }
  }
  if (next != slab.free_ranges.end() && offset + length == next->first) {
    length += next->second;
    erase_range(slab, next);
  }
  insert_range(slab, offset, length);
}

bool PinnedPool::grow(size_t nbytes, std::string& failure) {
  // See Note [Slab sizes] and Note [Failed host allocations]. Slabs smaller
  // than the request can never hold it, whether or not a new slab can be had:
  // under a tight budget they must make room for one that can.
  if (nbytes > outgrown_below_) {
    outgrown_below_ = nbytes;
    outgrown_slabs_ = true;
  }
  // Entirely free slabs too small for the request go at the next release;
  // they do not count against the budget here, or a pool that grew small
  // slabs under a tight budget could never make room for a larger one.
  size_t leaving = 0;
  for (const auto& slab : slabs_) {
    if (slab->entirely_free() && slab->capacity < nbytes) {
      leaving += slab->capacity;
    }
  }
  const size_t reserved =
      static_cast<size_t>(stats_.reserved_bytes) - leaving;
  const size_t needed = next_power_of_two(nbytes);
  const size_t doubling = std::clamp(
      previous_power_of_two(reserved),
      std::min(kMinSlabBytes, slab_bytes_),
      slab_bytes_);
  bool refused = false;
  for (size_t capacity = std::max(needed, doubling); capacity >= needed;
       capacity /= 2) {
    if (capacity >= failed_capacity_) {
      refused = true;
      continue;
    }
    if (reserved + capacity > budget_) {
      continue;
    }
    if (add_slab(capacity, failure)) {
      return true;
    }
    refused = true;
  }
  if (refused && failure.empty()) {
    failure = last_failure_;
  }
  return false;
}

bool PinnedPool::add_slab(size_t capacity, std::string& failure) {
  at::DataPtr data;
  std::string refusal;
  try {
    if (allocations_until_failure_ > 0) {
      allocations_until_failure_ -= 1;
    } else if (injected_failures_ > 0) {
      injected_failures_ -= 1;
      TORCH_CHECK_WITH(
          OutOfMemoryError,
          false,
          "injected failure of a ",
          capacity,
          "-byte host allocation (PinnedPool._fail_allocation_after)");
    }
    data = host_allocator(device_type_)->allocate(capacity);
  } catch (const c10::Error& error) {
    refusal = error.what_without_backtrace();
  } catch (const std::bad_alloc& error) {
    refusal = error.what();
  }
  if (!refusal.empty()) {
    failed_capacity_ = std::min(failed_capacity_, capacity);
    failure = last_failure_ = refusal;
    stats_.alloc_failures += 1;
    return false;
  }
  auto slab = std::make_shared<Slab>();
  slab->storage = c10::Storage(
      c10::Storage::use_byte_size_t(),
      capacity,
      std::move(data),
      /*allocator=*/nullptr,
      /*resizable=*/false);
  slab->capacity = capacity;
  slab->id = next_slab_id_++;
  insert_range(*slab, 0, capacity);
  slabs_.push_back(std::move(slab));
  stats_.reserved_bytes += static_cast<int64_t>(capacity);
  stats_.host_alloc_calls += 1;
  stats_.slabs = static_cast<int64_t>(slabs_.size());
  return true;
}

void PinnedPool::release(HostBlock block, Fence last_use) {
  Dropped dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  retiring_.emplace_back(std::move(block), std::move(last_use));
  collect_retired();
  drop_free_slabs(/*unwanted_only=*/true, dropped);
  // `lock` is released before `dropped` is destroyed (reverse declaration).
}

void PinnedPool::collect_retired() {
  auto still_busy = std::stable_partition(
      retiring_.begin(), retiring_.end(), [](const auto& entry) {
        return !entry.second.done();
      });
  for (auto it = still_busy; it != retiring_.end(); ++it) {
    HostBlock& block = it->first;
    give_back(*block.slab, block.offset, block.nbytes);
    stats_.in_use_bytes -= static_cast<int64_t>(block.nbytes);
  }
  retiring_.erase(still_busy, retiring_.end());
}

void PinnedPool::drop_free_slabs(bool unwanted_only, Dropped& dropped) {
  // See Note [Giving host memory back]. Cheap when nothing is unwanted: this
  // runs on every release.
  auto over_budget = [this] {
    return static_cast<size_t>(stats_.reserved_bytes) > budget_;
  };
  if (unwanted_only && !outgrown_slabs_ && !over_budget()) {
    return;
  }
  outgrown_slabs_ = false;
  for (size_t index = 0; index < slabs_.size();) {
    Slab& slab = *slabs_[index];
    const bool outgrown = slab.capacity < outgrown_below_;
    if (slab.entirely_free() &&
        (!unwanted_only || outgrown || over_budget())) {
      erase_range(slab, slab.free_ranges.begin());
      stats_.reserved_bytes -= static_cast<int64_t>(slab.capacity);
      dropped.push_back(std::move(slabs_[index]));
      slabs_.erase(slabs_.begin() + static_cast<std::ptrdiff_t>(index));
    } else {
      outgrown_slabs_ = outgrown_slabs_ || outgrown;
      ++index;
    }
  }
  stats_.slabs = static_cast<int64_t>(slabs_.size());
}

void PinnedPool::reserve(size_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  collect_retired();
  size_t free = 0;
  for (const auto& slab : slabs_) {
    free += slab->free_bytes;
  }
  if (free >= nbytes) {
    return;
  }
  // Slabs of slab_bytes, the last one a power of two just large enough; none
  // so small that it would be given back as outgrown (Note [Slab sizes]).
  std::vector<size_t> capacities;
  size_t total = 0;
  for (size_t missing = nbytes - free; missing > 0;) {
    const size_t capacity = std::max(
        std::min(slab_bytes_, next_power_of_two(missing)),
        next_power_of_two(outgrown_below_));
    capacities.push_back(capacity);
    total += capacity;
    missing -= std::min(capacity, missing);
  }
  TORCH_CHECK(
      static_cast<size_t>(stats_.reserved_bytes) + total <= budget_,
      "reserve(nbytes=",
      nbytes,
      ") needs ",
      total,
      " more bytes of slabs, which would exceed the host budget of ",
      budget_,
      " bytes; raise it with gcoffload.configure(host_budget_bytes=...)");
  for (size_t capacity : capacities) {
    std::string failure;
    TORCH_CHECK(
        add_slab(capacity, failure),
        "reserve(nbytes=",
        nbytes,
        "): the host refused a slab of ",
        capacity,
        " bytes for ",
        device_type_,
        " offloads (",
        failure,
        "). Pinned memory is capped on this host; lower the budget with "
        "gcoffload.configure(host_budget_bytes=...) or raise the cap "
        "(`ulimit -l`).");
  }
}

size_t PinnedPool::trim() {
  Dropped dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  collect_retired();
  failed_capacity_ = kUnlimited;
  const int64_t before = stats_.reserved_bytes;
  drop_free_slabs(/*unwanted_only=*/false, dropped);
  return static_cast<size_t>(before - stats_.reserved_bytes);
}

void PinnedPool::set_budget(size_t nbytes) {
  Dropped dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  budget_ = nbytes;
  stats_.budget_bytes =
      nbytes == kUnlimited ? -1 : static_cast<int64_t>(nbytes);
  failed_capacity_ = kUnlimited;
  collect_retired();
  drop_free_slabs(/*unwanted_only=*/true, dropped);
}

void PinnedPool::set_slab_bytes(size_t nbytes) {
  TORCH_CHECK(
      nbytes >= kAlignment && nbytes <= kMaxSlabBytes &&
          (nbytes & (nbytes - 1)) == 0,
      "slab_bytes must be a power of two from ",
      kAlignment,
      " to 2**62 bytes, got ",
      nbytes);
  std::lock_guard<std::mutex> lock(mutex_);
  slab_bytes_ = nbytes;
}

PoolStats PinnedPool::stats() {
  Dropped dropped;
  std::lock_guard<std::mutex> lock(mutex_);
  collect_retired();
  drop_free_slabs(/*unwanted_only=*/true, dropped);
  return stats_;
}

void PinnedPool::reset_peak() {
  std::lock_guard<std::mutex> lock(mutex_);
  // Buffers whose last copy has finished are not in use any more: the new
  // peak starts from what is, as stats() would report it.
  collect_retired();
  stats_.peak_in_use_bytes = stats_.in_use_bytes;
}

void PinnedPool::fail_allocation_after(int64_t successes, int64_t failures) {
  TORCH_CHECK(
      successes >= 0 && failures >= 0,
      "_fail_allocation_after: successes and failures must be >= 0, got ",
      successes,
      " and ",
      failures);
  std::lock_guard<std::mutex> lock(mutex_);
  allocations_until_failure_ = successes;
  injected_failures_ = failures;
}

} // namespace gcoffload
