#include "disk_tier.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>

namespace gcoffload {

// Note [The disk tier]
// ~~~~~~~~~~~~~~~~~~~~
// With over_budget='disk', an offload the pinned pool cannot hold goes to the
// disk tier, and no Python runs on the way:
//  * forward: the engine takes a place in the file and a staging buffer
//    (Note [Staging buffers]), and copies the tensor into the buffer on the
//    D2H stream as for any offload. The writer thread waits for that copy's
//    fence, writes the buffer to the place, and tells the engine, which gives
//    the buffer back unless backward has started using it meanwhile.
//  * backward: a read-ahead (CopyEngine::read_ahead, issued by the forward
//    chain further ahead than the H2D prefetch) takes a staging buffer and
//    queues the read on the reader thread. The H2D copy that follows is an
//    ordinary pinned copy if the read is done by then; if not, the engine's
//    worker issues it once that read is done (a blocking copy, as for
//    pageable memory), and `fetch` waits on the host for it. A tensor still in its
//    staging buffer when backward wants it (its write not yet done) comes back
//    from there, no read needed.
// Reads wait for the place's write, whatever thread is ahead. A place goes
// back only when the transfers touching it are done (DiskCopy's fences), so a
// new write never lands where a read still runs. A staging buffer goes back
// when the copies between it and the device are done, even if its write
// still runs: that happens only once its tensor was fetched or dropped, when
// what the write reads no longer matters (the write holds the memory itself).
// Errors: a failed write keeps the tensor in its staging buffer, so nothing
// is lost; the tier then takes no more writes, and the engine follows
// disk_fallback for later offloads (raising the write's error under 'error').
// A failed read raises from the `fetch` that needs it, in backward: the step
// fails, its graph and every buffer and place it held are given back, and
// the next step runs as if nothing happened.
// Checksums (a debug mode) hash the bytes before the write and after the
// read, and a mismatch fails the read.

// Note [Staging buffers]
// ~~~~~~~~~~~~~~~~~~~~~~
// Staging buffers come from a pinned pool of the tier's own, whose budget is
// disk_staging_bytes, on top of the host budget: the host budget is full by
// the time anything goes to disk. Writes free their buffer when done, so a
// disk slower than the forward pass fills the staging pool, and the offload
// that finds it full waits for the oldest write (counted as a stall). Reads
// ahead never wait: they stop at the limit, and the rest are read when the
// H2D prefetch needs them. A buffer the step needs now (an offload with no
// write left to wait for, or a fetch) goes past the limit rather than fail,
// and the limit grows with it: one tensor larger than disk_staging_bytes
// raises it to that tensor's size.

namespace {

constexpr uint64_t kNoBudget = std::numeric_limits<uint64_t>::max();

uint64_t round_up(uint64_t nbytes) {
  return (nbytes + DiskFile::kAlignment - 1) / DiskFile::kAlignment *
      DiskFile::kAlignment;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

// A 64-bit hash of `nbytes` bytes (FNV-1a over 8-byte words, the tail bytewise).
uint64_t checksum(const void* data, size_t nbytes) {
  constexpr uint64_t kPrime = 1099511628211ULL;
  uint64_t hash = 14695981039346656037ULL;
  const auto* bytes = static_cast<const unsigned char*>(data);
  size_t index = 0;
  for (; index + 8 <= nbytes; index += 8) {
    uint64_t word;
    std::memcpy(&word, bytes + index, 8);
    hash = (hash ^ word) * kPrime;
  }
  for (; index < nbytes; ++index) {
    hash = (hash ^ bytes[index]) * kPrime;
  }
  return hash;
}

std::string error_text(const std::exception& error) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&error)) {
    return c10_error->what_without_backtrace();
  }
  return error.what();
}

} // namespace

DiskCopy::DiskCopy(
    std::shared_ptr<DiskTier> tier,
    uint64_t offset,
    uint64_t length)
    : tier(std::move(tier)), offset(offset), length(length) {}

DiskCopy::~DiskCopy() {
  tier->free(offset, length, Fence::all({written, last_read}));
}

std::shared_ptr<DiskTier> DiskTier::open(
    c10::DeviceType device_type,
    const std::string& dir,
    int64_t budget_bytes,
    int64_t staging_bytes,
    bool checksums,
    std::shared_ptr<FaultInjector> faults) {
  TORCH_CHECK_VALUE(
      staging_bytes > 0,
      "disk_staging_bytes must be positive, got ",
      staging_bytes);
  return std::shared_ptr<DiskTier>(new DiskTier(
      device_type,
      dir,
      budget_bytes,
      staging_bytes,
      checksums,
      faults ? std::move(faults) : std::make_shared<FaultInjector>()));
}

DiskTier::DiskTier(
    c10::DeviceType device_type,
    const std::string& dir,
    int64_t budget_bytes,
    int64_t staging_bytes,
    bool checksums,
    std::shared_ptr<FaultInjector> faults)
    : faults_(std::move(faults)),
      file_(dir, *faults_),
      checksums_(checksums),
      budget_(budget_bytes < 0 ? kNoBudget : static_cast<uint64_t>(budget_bytes)),
      staging_(std::make_shared<PinnedPool>(device_type)) {
  staging_->set_budget(static_cast<size_t>(staging_bytes));
  stats_.budget_bytes = budget_bytes < 0 ? -1 : budget_bytes;
}

DiskTier::~DiskTier() = default;

std::shared_ptr<DiskCopy> DiskTier::allocate(size_t nbytes) {
  const uint64_t length = round_up(nbytes);
  std::lock_guard<std::mutex> lock(mutex_);
  collect_freed();
  if (static_cast<uint64_t>(stats_.bytes_on_disk) + length > budget_) {
    stats_.refused += 1;
    return nullptr;
  }
  // First fit from the start of the file keeps it short.
  uint64_t offset = file_end_;
  for (auto it = free_ranges_.begin(); it != free_ranges_.end(); ++it) {
    if (it->second >= length) {
      offset = it->first;
      const uint64_t rest = it->second - length;
      free_ranges_.erase(it);
      if (rest > 0) {
        free_ranges_.emplace(offset + length, rest);
      }
      break;
    }
  }
  if (offset == file_end_) {
    // The free range that ends the file, if any, is where growing starts.
    if (!free_ranges_.empty()) {
      auto last = std::prev(free_ranges_.end());
      if (last->first + last->second == file_end_) {
        offset = last->first;
        free_ranges_.erase(last);
      }
    }
    file_end_ = offset + length;
    stats_.file_bytes = std::max<int64_t>(stats_.file_bytes, file_end_);
  }
  stats_.bytes_on_disk += static_cast<int64_t>(length);
  stats_.peak_bytes_on_disk =
      std::max(stats_.peak_bytes_on_disk, stats_.bytes_on_disk);
  return std::make_shared<DiskCopy>(shared_from_this(), offset, length);
}

void DiskTier::free(uint64_t offset, uint64_t length, Fence last_use) {
  std::lock_guard<std::mutex> lock(mutex_);
  freeing_.emplace_back(offset, length, std::move(last_use));
  collect_freed();
}

void DiskTier::collect_freed() {
  auto still_busy = std::stable_partition(
      freeing_.begin(), freeing_.end(), [](const auto& entry) {
        return !std::get<2>(entry).done();
      });
  for (auto it = still_busy; it != freeing_.end(); ++it) {
    insert_free(std::get<0>(*it), std::get<1>(*it));
    stats_.bytes_on_disk -= static_cast<int64_t>(std::get<1>(*it));
  }
  freeing_.erase(still_busy, freeing_.end());
}

void DiskTier::insert_free(uint64_t offset, uint64_t length) {
  auto next = free_ranges_.lower_bound(offset);
  if (next != free_ranges_.begin()) {
    auto previous = std::prev(next);
    if (previous->first + previous->second == offset) {
      offset = previous->first;
      length += previous->second;
      free_ranges_.erase(previous);
    }
  }
  if (next != free_ranges_.end() && offset + length == next->first) {
    length += next->second;
    free_ranges_.erase(next);
  }
  free_ranges_.emplace(offset, length);
}

std::optional<Staging> DiskTier::acquire_staging(size_t nbytes, Wait wait) {
  // See Note [Staging buffers]. One alignment's slack puts the aligned part
  // anywhere in the pool's buffer.
  const size_t length = round_up(nbytes);
  const size_t size = length + DiskFile::kAlignment;
  const auto start = std::chrono::steady_clock::now();
  std::optional<HostBlock> block = staging_->acquire(size);
  bool waited = false;
  while (!block && wait == Wait::ForWrites && wait_for_a_write()) {
    waited = true;
    block = staging_->acquire(size);
  }
  if (!block && wait != Wait::Never) {
    const PoolStats pool = staging_->stats();
    staging_->set_budget(static_cast<size_t>(pool.reserved_bytes) + size * 2);
    block = staging_->acquire(size);
    TORCH_CHECK(
        block,
        "gcoffload disk tier: the host refused ",
        size,
        " bytes of pinned memory for a staging buffer. Lower "
        "disk_staging_bytes or host_budget_bytes to leave room for it.");
  }
  if (waited) {
    add_stall(seconds_since(start));
  }
  if (!block) {
    return std::nullopt;
  }
  const auto base = reinterpret_cast<uintptr_t>(block->slab->storage.data()) +
      block->offset;
  const size_t skip = (DiskFile::kAlignment - base % DiskFile::kAlignment) %
      DiskFile::kAlignment;
  HostBlock aligned{block->slab, block->offset + skip, length};
  return Staging{*block, aligned.view(at::kByte, {static_cast<int64_t>(length)})};
}

void DiskTier::drop_finished_writes() {
  while (!writes_queued_.empty() && writes_queued_.front().done()) {
    writes_queued_.pop_front();
  }
}

bool DiskTier::wait_for_a_write() {
  Fence oldest;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    drop_finished_writes();
    if (writes_queued_.empty()) {
      return false;
    }
    oldest = writes_queued_.front();
  }
  oldest.synchronize();
  return true;
}

void DiskTier::write(
    std::shared_ptr<DiskCopy> copy,
    at::Tensor source,
    Fence filled,
    std::function<void(const std::string& error)> on_done) {
  const Fence written = copy->written;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    drop_finished_writes(); // or the queue grows by every write of a long run
    writes_queued_.push_back(written);
  }
  writer_.submit(
      [this, copy, source, filled, on_done]() mutable {
        std::string error;
        auto start = std::chrono::steady_clock::now();
        try {
          filled.synchronize();
          start = std::chrono::steady_clock::now(); // the transfer alone
          if (checksums_) {
            copy->checksum = checksum(source.data_ptr(), source.nbytes());
          }
          file_.write(source.data_ptr(), copy->length, copy->offset);
        } catch (const std::exception& failure) {
          error = error_text(failure);
        }
        {
          std::lock_guard<std::mutex> lock(mutex_);
          stats_.write_seconds += seconds_since(start);
          if (error.empty()) {
            stats_.writes += 1;
            stats_.written_bytes += static_cast<int64_t>(copy->length);
          } else {
            stats_.failed_writes += 1;
            if (failure_.empty()) {
              failure_ = error;
            }
          }
        }
        on_done(error);
        source = at::Tensor();
        const Fence written = copy->written;
        copy.reset();
        written.signal();
      },
      written);
}

Fence DiskTier::read(std::shared_ptr<DiskCopy> copy, at::Tensor destination) {
  Fence done = Fence::host_signal();
  copy->last_read = done;
  reader_.submit(
      [this, copy, destination, done]() mutable {
        std::string error;
        auto start = std::chrono::steady_clock::now();
        try {
          copy->written.synchronize();
          start = std::chrono::steady_clock::now(); // the transfer alone
          file_.read(destination.data_ptr(), copy->length, copy->offset);
          TORCH_CHECK(
              !checksums_ ||
                  checksum(destination.data_ptr(), destination.nbytes()) ==
                      copy->checksum,
              "gcoffload disk tier: the ",
              copy->length,
              " bytes read back from offset ",
              copy->offset,
              " of its file in disk_dir='",
              file_.dir(),
              "' differ from those written (checksum mismatch): the disk or "
              "its filesystem corrupted them. Check the disk, or point "
              "disk_dir (or GCOFFLOAD_DISK_DIR) at another one.");
        } catch (const std::exception& failure) {
          error = error_text(failure);
        }
        {
          std::lock_guard<std::mutex> lock(mutex_);
          stats_.read_seconds += seconds_since(start);
          if (error.empty()) {
            stats_.reads += 1;
            stats_.read_bytes += static_cast<int64_t>(copy->length);
          }
        }
        destination = at::Tensor();
        copy.reset();
        done.signal(std::move(error));
      },
      done);
  return done;
}

std::string DiskTier::failure() {
  std::lock_guard<std::mutex> lock(mutex_);
  return failure_;
}

void DiskTier::add_stall(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.stall_seconds += seconds;
}

DiskStats DiskTier::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  collect_freed();
  return stats_;
}

void DiskTier::reset_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  collect_freed();
  DiskStats fresh;
  fresh.bytes_on_disk = fresh.peak_bytes_on_disk = stats_.bytes_on_disk;
  fresh.file_bytes = stats_.file_bytes;
  fresh.budget_bytes = stats_.budget_bytes;
  stats_ = fresh;
}

void DiskTier::synchronize() {
  const Fence writes = writer_.drained();
  const Fence reads = reader_.drained();
  writes.synchronize();
  reads.synchronize();
  std::lock_guard<std::mutex> lock(mutex_);
  collect_freed();
}

int64_t DiskTier::trim() {
  std::lock_guard<std::mutex> lock(mutex_);
  collect_freed();
  uint64_t end = file_end_;
  if (!free_ranges_.empty()) {
    auto last = std::prev(free_ranges_.end());
    if (last->first + last->second == file_end_) {
      end = last->first;
      free_ranges_.erase(last);
    }
  }
  file_.truncate(end);
  const int64_t freed = stats_.file_bytes - static_cast<int64_t>(end);
  file_end_ = end;
  stats_.file_bytes = static_cast<int64_t>(end);
  return freed;
}

} // namespace gcoffload
