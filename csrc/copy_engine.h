#pragma once

#include "disk_tier.h"
#include "fence.h"
#include "host_worker.h"
#include "pinned_pool.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <c10/core/TensorImpl.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gcoffload {

// What `offload` does when the pool's host budget cannot hold another buffer.
enum class OverBudget {
  Keep, // keep the tensor where it is; `fetch` returns it without a copy
  Pageable, // copy into ordinary (pageable) host memory: slower, unbounded
  Error, // raise
  Disk, // write it to the disk tier; past it, follow the tier's fallback
};

struct EngineStats {
  int64_t offloads = 0; // device-to-host copies issued
  int64_t offloaded_bytes = 0;
  int64_t prefetches = 0; // host-to-device copies issued ahead of their fetch
  int64_t fetches = 0;
  int64_t prefetch_hits = 0; // fetches whose copy was already issued
  int64_t on_demand_fetches = 0; // fetches that had to issue their copy
  int64_t fetched_bytes = 0;
  int64_t kept_on_device = 0; // offloads refused by the budget (Keep)
  int64_t pageable_spills = 0; // offloads past the budget (Pageable)
  int64_t disk_spills = 0; // offloads past the budget written to disk (Disk)
  int64_t read_aheads = 0; // disk reads issued ahead of their prefetch
  int64_t pending_handoffs = 0; // see Note [Source lifetime]
  int64_t live_handles = 0;
};

// One entry of the engine's trace, times in ms since `start_trace`.
struct TraceEntry {
  std::string op; // "offload", "prefetch", "fetch" or "mark"
  std::string stream; // "d2h", "h2d" or "compute"
  int64_t handle_id = -1;
  int64_t nbytes = 0;
  std::string label;
  double start_ms = 0;
  double end_ms = 0;
};

class CopyEngine;

// The receipt for one offloaded tensor. Dropping it (or `release`) returns
// whatever it still holds; see Note [Dropped handles].
class Handle {
 public:
  enum class State { Offloaded, Prefetched, Fetched, Released };
  enum class Placement { Pool, Pageable, Device, Empty, Disk };

  ~Handle();
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  int64_t id() const {
    return id_;
  }
  const std::vector<int64_t>& sizes() const {
    return sizes_;
  }
  at::ScalarType dtype() const {
    return dtype_;
  }
  int64_t nbytes() const {
    return nbytes_;
  }
  State state() const {
    return state_.load();
  }
  Placement placement() const {
    return placement_;
  }
  // The offloaded tensor's version counter now; see Note [Watched versions].
  int64_t source_version() const {
    return source_version_.enabled()
        ? static_cast<int64_t>(source_version_.current_version())
        : 0;
  }
  void release();

 private:
  friend class CopyEngine;
  Handle(std::shared_ptr<CopyEngine> engine, int64_t id, const at::Tensor& like);

  const std::shared_ptr<CopyEngine> engine_;
  const int64_t id_;
  const std::vector<int64_t> sizes_;
  const at::ScalarType dtype_;
  const int64_t nbytes_;
  Placement placement_ = Placement::Empty;
  std::atomic<State> state_{State::Offloaded};
  // Pool: the pool buffer behind `host_`; Disk: the staging buffer, while
  // the bytes are in it (Note [The disk tier] in disk_tier.cpp).
  std::optional<HostBlock> block_;
  at::Tensor host_; // Pool, Pageable, or Disk while staged: the bytes
  std::shared_ptr<DiskCopy> disk_; // Disk: the bytes' place on the disk
  at::Tensor device_; // Prefetched, or Device: the tensor on the device
  Fence d2h_done_; // `host_` holds the bytes: offload copy (or disk read) done
  Fence h2d_done_; // the copy from `host_` into `device_` finished
  c10::VariableVersion source_version_{c10::VariableVersion::DISABLED};
};

// Copies tensors between one device and host memory on two side streams, one
// per direction, so both directions of the bus run at once and neither blocks
// the compute stream. On the CPU every copy is synchronous and the same code
// exercises the pool, the handles and their ordering.
//
// Thread-safe: autograd runs a CUDA backward on its own device thread.
class CopyEngine : public std::enable_shared_from_this<CopyEngine> {
 public:
  static std::shared_ptr<CopyEngine> create(
      c10::Device device,
      std::shared_ptr<PinnedPool> pool);

  // Starts copying `tensor` to host memory; returns immediately. `to_disk`:
  // straight to the disk tier under over_budget='disk', leaving the host
  // budget to later tensors (the pool if the tier cannot take it).
  std::shared_ptr<Handle> offload(const at::Tensor& tensor, bool to_disk = false);
  // Starts copying the handle's bytes back; false if nothing was issued
  // (already prefetched or fetched, or never left the device).
  bool prefetch(Handle& handle);
  // Starts reading a handle's bytes from the disk tier into staging, ahead
  // of its prefetch; false if nothing was issued (not on disk, already
  // staged, or the staging limit reached).
  bool read_ahead(Handle& handle);
  // The tensor back on the device, ready for work on the current stream.
  at::Tensor fetch(Handle& handle);
  // Returns what `handle` still holds; idempotent.
  void release(Handle& handle);
  // Blocks until every copy issued so far has finished.
  void synchronize();

  void set_over_budget(OverBudget policy);
  // The tier over_budget='disk' writes to (null: none), and what offloads do
  // past its budget or after it failed (Keep, Pageable or Error).
  void set_disk_tier(std::shared_ptr<DiskTier> tier, OverBudget fallback);
  std::shared_ptr<DiskTier> disk_tier();
  void set_max_pending(int64_t max_pending);
  EngineStats stats();
  void reset_stats();

  void start_trace();
  std::vector<TraceEntry> stop_trace();
  void mark(const std::string& label);

  c10::Device device() const {
    return device_;
  }
  const std::shared_ptr<PinnedPool>& pool() const {
    return pool_;
  }

 private:
  // The memory a copy may still read or write (a detached alias: the
  // storage, never the caller's tensor and its autograd history), the copy's
  // fence and stream, and the handle the copy belongs to.
  struct Pending {
    at::Tensor tensor;
    Fence fence;
    c10::Stream copy_stream;
    int64_t handle_id;
  };

  CopyEngine(c10::Device device, std::shared_ptr<PinnedPool> pool);

  // Raises, naming the argument, unless `offload` can copy `tensor`.
  void check_offloadable(const at::Tensor& tensor) const;

  // Private members expect `mutex_` to be held. Tensors they stop referencing
  // go into `dropped`, which the caller destroys after unlocking: destroying a
  // tensor that Python also knew may take the GIL.
  c10::Stream compute_stream() const;
  void keep_until_done(
      const at::Tensor& tensor,
      Fence fence,
      const c10::Stream& copy_stream,
      int64_t handle_id,
      std::vector<at::Tensor>& dropped);
  // Gives a pending entry's memory to the caching allocator, which reuses it
  // only after the copy; see Note [Source lifetime].
  void hand_off(Pending& entry, std::vector<at::Tensor>& dropped);
  // Queues a blocking copy on the worker, to run once `after` is done; see
  // Note [Pageable copies off the compute thread].
  Fence copy_on_worker(
      const c10::Stream& stream,
      at::Tensor destination,
      at::Tensor source,
      Fence after = Fence());
  // Where the handle's bytes go: the disk straight away (`to_disk`), the
  // pool, or past it as over_budget says; Device (kept) takes `source`.
  void place(
      Handle& handle,
      at::Tensor& source,
      bool to_disk,
      std::unique_lock<std::mutex>& lock);
  // Gives the handle a place on the disk tier and a staging buffer as
  // `host_`; returns why it could not ("" on success). Unlocks `lock` while
  // it waits for staging.
  std::string spill_to_disk(Handle& handle, std::unique_lock<std::mutex>& lock);
  // The writer thread's report that `handle`'s write is over.
  void on_written(const std::weak_ptr<Handle>& handle, const std::string& error);
  // Queues the read of a handle whose bytes are on disk only into a staging
  // buffer; false if `wait` is Never and the staging limit is reached.
  bool start_read(Handle& handle, DiskTier::Wait wait);
  // Makes `staging` the handle's host buffer, `host_` its bytes as the tensor.
  void stage(Handle& handle, const Staging& staging);
  // Gives the handle's host buffer back to the pool it came from.
  void release_block(Handle& handle, Fence last_use);
  void poll_pending(std::vector<at::Tensor>& dropped);
  void copy_to_device(Handle& handle);
  void release_locked(Handle& handle, std::vector<at::Tensor>& dropped);
  // Makes the compute stream wait for `fence`; traced as a stall.
  void wait_on_compute(
      const Fence& fence,
      const char* op,
      const Handle* handle,
      std::string label = {});
  void trace(
      const char* op,
      const char* stream,
      const Handle* handle,
      const Fence& start,
      const Fence& end,
      std::string label = {});

  const c10::Device device_;
  const bool has_streams_;
  const c10::Stream d2h_stream_;
  const c10::Stream h2d_stream_;
  const std::shared_ptr<PinnedPool> pool_;


  std::mutex mutex_;
  std::deque<Pending> pending_;
  size_t max_pending_ = 32;
  OverBudget over_budget_ = OverBudget::Keep;
  std::shared_ptr<DiskTier> disk_tier_;
  OverBudget disk_fallback_ = OverBudget::Error;
  EngineStats stats_;
  int64_t next_id_ = 0;

  bool tracing_ = false;
  Fence trace_origin_;
  struct TraceRecord {
    TraceEntry entry;
    Fence start;
    Fence end;
  };
  std::vector<TraceRecord> trace_;
  // Last: destroyed first, while the pending tensors its jobs use still live.
  HostWorker worker_;
};

} // namespace gcoffload
