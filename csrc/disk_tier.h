#pragma once

#include "disk_file.h"
#include "fence.h"
#include "host_worker.h"
#include "pinned_pool.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gcoffload {

class DiskTier;

// One tensor's bytes in the tier's file: where they are, and the fences of
// the transfers that touch them. Destroying it gives the place back once
// those transfers are done.
struct DiskCopy {
  DiskCopy(std::shared_ptr<DiskTier> tier, uint64_t offset, uint64_t length);
  ~DiskCopy();
  DiskCopy(const DiskCopy&) = delete;
  DiskCopy& operator=(const DiskCopy&) = delete;

  const std::shared_ptr<DiskTier> tier;
  const uint64_t offset;
  const uint64_t length; // a multiple of DiskFile::kAlignment
  Fence written = Fence::host_signal(); // the write finished (or failed)
  Fence last_read; // the last read queued
  uint64_t checksum = 0; // of the bytes written, in checksum mode
};

// A pinned buffer the tier's transfers go through: `block` from the staging
// pool, and `bytes`, its DiskFile::kAlignment-aligned part, as uint8.
struct Staging {
  HostBlock block;
  at::Tensor bytes;
};

struct DiskStats {
  int64_t writes = 0;
  int64_t written_bytes = 0;
  double write_seconds = 0; // the writer thread's time in transfers
  int64_t reads = 0;
  int64_t read_bytes = 0;
  double read_seconds = 0; // the reader thread's time in transfers
  double stall_seconds = 0; // training threads' time waiting for the tier
  int64_t refused = 0; // places refused by the disk budget
  int64_t failed_writes = 0;
  int64_t bytes_on_disk = 0; // places in use or waiting for their transfers
  int64_t peak_bytes_on_disk = 0;
  int64_t file_bytes = 0; // the file's length
  int64_t budget_bytes = -1; // -1: no budget
};

// The tier below host memory: what does not fit the pinned host budget goes
// to one unnamed file in `disk_dir`, through pinned staging buffers, on two
// I/O threads (one writes, one reads) of its own. Shared by the engines of a
// device type, as the pinned pool is; see Note [The disk tier] in
// disk_tier.cpp.
class DiskTier : public std::enable_shared_from_this<DiskTier> {
 public:
  // Creates the file now; raises, naming disk_dir, if it cannot.
  static std::shared_ptr<DiskTier> open(
      c10::DeviceType device_type,
      const std::string& dir,
      int64_t budget_bytes,
      int64_t staging_bytes,
      bool checksums,
      std::shared_ptr<FaultInjector> faults);
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  // A place for `nbytes`, or nothing past the disk budget.
  std::shared_ptr<DiskCopy> allocate(size_t nbytes);

  // What `acquire_staging` does when the staging limit is reached.
  enum class Wait {
    Never, // returns nothing
    ForWrites, // waits for queued writes to free staging, then goes past it
    Grow, // goes past it at once
  };
  // A staging buffer of at least `nbytes` (rounded up to the alignment);
  // see Note [Staging buffers]. Raises if the host refuses pinned memory.
  std::optional<Staging> acquire_staging(size_t nbytes, Wait wait);
  PinnedPool& staging_pool() {
    return *staging_;
  }

  // Queues the write of `source` (a staging buffer holding `copy->length`
  // bytes once `filled` is done) to `copy`'s place. `on_done(error)` runs on
  // the writer thread when it is over, before `copy->written` completes; a
  // failed write leaves the bytes in `source`.
  void write(
      std::shared_ptr<DiskCopy> copy,
      at::Tensor source,
      Fence filled,
      std::function<void(const std::string& error)> on_done);
  // Queues the read of `copy` into `destination` (a staging buffer), after
  // its write; returns the read's fence, which raises what the read raised.
  Fence read(std::shared_ptr<DiskCopy> copy, at::Tensor destination);

  // The first failed write's error ("" if none): the tier takes no more
  // writes after it.
  std::string failure();
  void add_stall(double seconds);
  DiskStats stats();
  void reset_stats();
  // Blocks until every queued transfer is over.
  void synchronize();
  // Truncates the file past the last place in use; returns the bytes freed.
  int64_t trim();

  const std::string& dir() const {
    return file_.dir();
  }
  bool direct() const {
    return file_.direct();
  }
  const char* naming() const {
    return file_.naming();
  }
  bool checksums() const {
    return checksums_;
  }

 private:
  friend struct DiskCopy;
  DiskTier(
      c10::DeviceType device_type,
      const std::string& dir,
      int64_t budget_bytes,
      int64_t staging_bytes,
      bool checksums,
      std::shared_ptr<FaultInjector> faults);

  // Gives a place back once `last_use` is done.
  void free(uint64_t offset, uint64_t length, Fence last_use);
  // Expect `mutex_` held.
  void collect_freed();
  void drop_finished_writes();
  void insert_free(uint64_t offset, uint64_t length);
  // Waits for the oldest queued write; false if none is queued.
  bool wait_for_a_write();

  const std::shared_ptr<FaultInjector> faults_;
  DiskFile file_;
  const bool checksums_;
  const uint64_t budget_; // UINT64_MAX: none
  const std::shared_ptr<PinnedPool> staging_;

  std::mutex mutex_;
  std::map<uint64_t, uint64_t> free_ranges_; // offset -> length, coalesced
  uint64_t file_end_ = 0; // everything past it is free
  std::vector<std::tuple<uint64_t, uint64_t, Fence>> freeing_;
  std::deque<Fence> writes_queued_;
  std::string failure_;
  DiskStats stats_;

  // Last: destroyed first, while what their jobs use still lives.
  HostWorker reader_;
  HostWorker writer_;
};

} // namespace gcoffload
