#pragma once

#include "stream.h"

#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Storage.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace simdev {

// The index of the statistics simdev keeps in each c10 StatArray.
constexpr size_t kAggregateStat = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

// Device memory: a stream-ordered caching allocator, like CUDA's.
//
// A block belongs to the stream that was current when it was allocated. Once
// freed it is at once reusable by that stream, most recently freed first, and
// a job queued on that stream at free time overwrites it with 0xFF bytes (NaN
// for floats). Work on the owning stream is ordered around that poison; work
// on another stream that still touches the block without a wait reads
// garbage, as it could on a GPU. Blocks never go back to the system while
// streams may touch them: only `empty_cache`, after synchronising every
// stream, frees cached blocks. As a c10::DeviceAllocator it also serves
// torch.accelerator's memory statistics.
class DeviceAllocator final : public c10::DeviceAllocator {
 public:
  // Sizes are rounded up to this many bytes (CUDA's smallest block size).
  static constexpr size_t kRounding = 512;
  static constexpr unsigned char kPoison = 0xFF;

  c10::DataPtr allocate(size_t nbytes) override;
  // Queued on the current stream, like every device-side write.
  void copy_data(void* dest, const void* src, std::size_t count) const override;

  bool initialized() override {
    return true;
  }
  // Frees every cached block of every device (synchronises all streams first).
  void emptyCache(c10::MempoolId_t pool = {0, 0}) override;
  // See Note [record_stream].
  void recordStream(const c10::DataPtr& data, c10::Stream stream) override;
  // Bytes and blocks in use (allocated_bytes, allocation: rounded sizes) and
  // held (reserved_bytes, segment), in the aggregate entry of each array.
  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(c10::DeviceIndex device) override;
  void resetAccumulatedStats(c10::DeviceIndex device) override;
  void resetPeakStats(c10::DeviceIndex device) override;

 private:
  struct Block;
  struct Pending {
    Block* block;
    std::vector<std::shared_ptr<Recording>> uses;
  };
  struct DeviceState {
    std::mutex mutex;
    // (owning stream, rounded size) -> freed blocks, most recent last.
    std::map<std::pair<c10::StreamId, size_t>, std::vector<Block*>> free;
    std::vector<Pending> pending;
    c10::CachingDeviceAllocator::DeviceStats stats;
  };

  static void delete_block(void* context);
  void release(Block* block);
  void collect_pending(DeviceState& state);
  void make_reusable(DeviceState& state, Block* block);
  DeviceState& state(c10::DeviceIndex device);

  DeviceState states_[kDeviceCount];
};

DeviceAllocator& device_allocator();

// Grows or shrinks a simdev storage to `nbytes`. The old contents are copied
// on the current stream, like CUDA's resize.
void resize_storage(const c10::Storage& storage, size_t nbytes);

} // namespace simdev
