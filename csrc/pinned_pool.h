#pragma once

#include "fence.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/Storage.h>

#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace gcoffload {

// One host allocation that buffers are carved from. Its free space is a set of
// disjoint ranges; neighbours are merged as soon as both are free.
struct Slab : std::enable_shared_from_this<Slab> {
  at::Storage storage;
  size_t capacity = 0;
  uint64_t id = 0; // allocation order: ties in best fit go to the oldest slab
  std::map<size_t, size_t> free_ranges; // offset -> length
  size_t free_bytes = 0; // sum of free_ranges

  bool entirely_free() const {
    return free_bytes == capacity;
  }
};

// One host buffer: `nbytes` (aligned) bytes at `offset` inside `slab`.
struct HostBlock {
  std::shared_ptr<Slab> slab;
  size_t offset = 0;
  size_t nbytes = 0;

  // A contiguous CPU tensor of `sizes` and `dtype` over this buffer. It shares
  // the slab's storage, so the memory outlives the view even after a trim.
  at::Tensor view(at::ScalarType dtype, at::IntArrayRef sizes) const;
};

struct PoolStats {
  int64_t reserved_bytes = 0; // held in slabs
  int64_t in_use_bytes = 0; // handed out, or waiting for their last copy
  int64_t peak_in_use_bytes = 0;
  int64_t host_alloc_calls = 0; // slabs allocated over the pool's life
  int64_t alloc_failures = 0; // slab allocations the host refused
  int64_t reuse_hits = 0; // acquires served without allocating a slab
  int64_t spills = 0; // acquires refused (budget or failed allocation)
  int64_t slabs = 0;
  int64_t budget_bytes = 0;
};

// Host buffers for offloaded tensors, carved from a few large slabs.
//
// Each slab keeps its free space as coalesced ranges, and a request takes the
// smallest free range that holds it (best fit), splitting off the rest. A
// training step offloads the same shapes every time, so once the slabs hold
// one step's peak every acquire is served from them and the pool makes no host
// allocation; growing or shuffled shapes reuse the space that smaller or
// larger buffers left, with nothing lost to size classes. Slabs grow
// geometrically with demand, up to `slab_bytes`; see Note [Slab sizes].
//
// Slabs for an accelerator come from torch's host allocator for that device
// type (page-locked memory that DMA engines can read without staging); for the
// CPU, from the CPU allocator. When memory goes back is the subject of
// Note [Giving host memory back]: never inside `acquire`.
//
// Thread-safe: autograd runs a CUDA backward on its own device thread.
class PinnedPool {
 public:
  static constexpr size_t kAlignment = 512;
  // Smallest slab grown on demand (unless slab_bytes is smaller).
  static constexpr size_t kMinSlabBytes = size_t{1} << 20;
  static constexpr size_t kMaxSlabBytes = size_t{1} << 62;
  static constexpr size_t kUnlimited = std::numeric_limits<size_t>::max();

  explicit PinnedPool(c10::DeviceType device_type);
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  c10::DeviceType device_type() const {
    return device_type_;
  }

  // A buffer of at least `nbytes`, or nothing if the budget does not allow it
  // or the host refuses the memory (warned once per pool). Never gives memory
  // back.
  std::optional<HostBlock> acquire(size_t nbytes);

  // Gives `block` back. It becomes reusable once `last_use` (the copy that
  // last read or wrote it) is done; see Note [Host buffer reuse].
  void release(HostBlock block, Fence last_use);

  // Allocates slabs until at least `nbytes` are free.
  void reserve(size_t nbytes);

  // Gives back every slab none of whose buffers is in use; returns the bytes.
  size_t trim();

  // Caps the bytes held in slabs. Lowering it gives back unused slabs at once
  // and the others as their buffers come back.
  void set_budget(size_t nbytes);
  void set_slab_bytes(size_t nbytes);
  PoolStats stats();
  void reset_peak();

  // Test hook: lets `successes` host allocations through, then makes the next
  // `failures` throw as an allocator out of memory does.
  void fail_allocation_after(int64_t successes, int64_t failures);

 private:
  // A free range in the best-fit index, ordered by length first.
  struct FreeRange {
    size_t length;
    uint64_t slab_id;
    size_t offset;
    Slab* slab;
    bool operator<(const FreeRange& other) const {
      return std::tie(length, slab_id, offset) <
          std::tie(other.length, other.slab_id, other.offset);
    }
  };
  using Dropped = std::vector<std::shared_ptr<Slab>>;

  // Private members expect `mutex_` to be held. Slabs they give back go into
  // `dropped`, which the caller destroys after unlocking.
  void collect_retired();
  std::optional<HostBlock> take_free(size_t nbytes);
  void insert_range(Slab& slab, size_t offset, size_t length);
  void erase_range(Slab& slab, std::map<size_t, size_t>::iterator range);
  void give_back(Slab& slab, size_t offset, size_t length);
  bool grow(size_t nbytes, std::string& failure);
  bool add_slab(size_t capacity, std::string& failure);
  void drop_free_slabs(bool unwanted_only, Dropped& dropped);

  const c10::DeviceType device_type_;
  std::mutex mutex_;
  std::vector<std::shared_ptr<Slab>> slabs_;
  std::set<FreeRange> free_by_size_;
  std::vector<std::pair<HostBlock, Fence>> retiring_;
  size_t budget_ = kUnlimited;
  size_t slab_bytes_ = size_t{256} << 20;
  uint64_t next_slab_id_ = 0;
  // Slabs smaller than this are given back once entirely free; see
  // Note [Slab sizes]. `outgrown_slabs_`: some slab may be that small.
  size_t outgrown_below_ = 0;
  bool outgrown_slabs_ = false;
  // See Note [Failed host allocations].
  size_t failed_capacity_ = kUnlimited;
  std::string last_failure_;
  bool warned_failure_ = false;
  int64_t allocations_until_failure_ = 0; // test hook
  int64_t injected_failures_ = 0; // test hook
  PoolStats stats_;
};

} // namespace gcoffload
