#pragma once

#include "fence.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/Storage.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <map>
#include <utility>
#include <vector>

namespace gcoffload {

// A large host allocation that buffers are carved from.
struct Slab {
  at::Storage storage;
  size_t capacity = 0;
  size_t carved = 0; // bytes handed out by the bump pointer so far
  size_t live = 0; // carved buffers not sitting in a free list
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
  int64_t reuse_hits = 0; // acquires served from a free list
  int64_t spills = 0; // acquires refused because of the budget
  int64_t slabs = 0;
  int64_t budget_bytes = 0;
};

// Host buffers for offloaded tensors, reused by (aligned) size.
//
// Buffers are carved from slabs with a bump pointer and, once released, kept
// in a free list keyed by their size: a training step offloads the same shapes
// every time, so from the second step on every acquire is a free-list hit and
// the pool makes no host allocation. A request takes an exact-size buffer, or
// the smallest free one at most a quarter larger. Slabs for an accelerator come from torch's
// host allocator for that device type (page-locked memory that DMA engines can
// read without staging); for the CPU, from the CPU allocator. Slab sizes are
// powers of two, so torch's power-of-two rounding wastes nothing.
//
// Thread-safe: autograd runs a CUDA backward on its own device thread.
class PinnedPool {
 public:
  static constexpr size_t kAlignment = 512;
  static constexpr size_t kReuseSlack = 4; // reuse buffers up to 1/4 larger
  static constexpr size_t kUnlimited = std::numeric_limits<size_t>::max();

  explicit PinnedPool(c10::DeviceType device_type);
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  c10::DeviceType device_type() const {
    return device_type_;
  }

  // A buffer of at least `nbytes`, or nothing if the budget does not allow it.
  std::optional<HostBlock> acquire(size_t nbytes);

  // Gives `block` back. It becomes reusable once `last_use` (the copy that
  // last read or wrote it) is done; see Note [Host buffer reuse].
  void release(HostBlock block, Fence last_use);

  // Allocates slabs until at least `nbytes` are free for carving.
  void reserve(size_t nbytes);

  // Frees every slab none of whose buffers is in use; returns the bytes freed.
  size_t trim();

  // Caps the bytes held in slabs; lowering it trims unused slabs at once.
  void set_budget(size_t nbytes);
  void set_slab_bytes(size_t nbytes);
  PoolStats stats();
  void reset_peak();

 private:
  // Private members but release_to_system expect `mutex_` to be held.
  void collect_retired();
  std::optional<HostBlock> take_free(size_t nbytes);
  std::optional<HostBlock> carve(size_t nbytes);
  std::optional<size_t> new_slab_capacity(size_t nbytes) const;
  void add_slab(size_t capacity);
  size_t trim_locked();
  void release_to_system();

  const c10::DeviceType device_type_;
  std::mutex mutex_;
  std::vector<std::shared_ptr<Slab>> slabs_;
  std::map<size_t, std::vector<HostBlock>> free_; // by size, for best fit
  std::vector<std::pair<HostBlock, Fence>> retiring_;
  size_t budget_ = kUnlimited;
  size_t slab_bytes_ = size_t{256} << 20;
  PoolStats stats_;
};

} // namespace gcoffload
