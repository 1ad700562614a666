#pragma once

#include <c10/core/Device.h>
#include <c10/core/Stream.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

namespace simdev {

// The simulated devices: simdev:0 and simdev:1.
constexpr c10::DeviceIndex kDeviceCount = 2;
// Streams per priority in each device's pool (CUDA has 32); two pool requests
// can return the same stream, as on CUDA.
constexpr int kPoolSize = 4;

// Work queued on a stream: runs on the stream's worker thread.
using Job = std::function<void()>;

// One device queue. A worker thread (started on first use) runs the jobs in
// the order they were queued; streams run concurrently with each other and
// with the host. Each job gets a sequence number, 1-based, so "everything up
// to job n has finished" is a number to compare against.
//
// Streams live for the whole process (like CUDA's): the registry leaks them, so
// a worker never outlives its queue.
class Stream {
 public:
  Stream(c10::DeviceIndex device, c10::StreamId id);
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  c10::StreamId id() const {
    return id_;
  }
  c10::DeviceIndex device_index() const {
    return device_;
  }
  c10::Stream handle() const;

  // Queues `job` and returns its sequence number.
  uint64_t enqueue(Job job);
  // The sequence number of the last job queued so far (0 if none).
  uint64_t last_enqueued() const;
  // True once job `seq` and every job before it have finished.
  bool reached(uint64_t seq) const;
  // Blocks the calling thread (host or another stream's worker) until reached.
  void wait(uint64_t seq) const;

 private:
  void run();

  const c10::DeviceIndex device_;
  const c10::StreamId id_;
  mutable std::mutex mutex_;
  std::condition_variable work_;
  mutable std::condition_variable done_;
  std::deque<Job> queue_;
  uint64_t enqueued_ = 0;
  uint64_t completed_ = 0;
  bool started_ = false;
};

// A point in a stream's queue (what one event record marks). `time` is stamped
// by the worker when the marker runs; read it only once the marker is reached.
struct Recording {
  Stream* stream = nullptr;
  uint64_t seq = 0;
  std::chrono::steady_clock::time_point time;
};

// Queues a marker on `stream` and returns it.
std::shared_ptr<Recording> record(Stream& stream);
// Makes `stream` wait (on the device) until `recording` is reached.
void block(Stream& stream, const std::shared_ptr<Recording>& recording);

// A test hook: the stream stops before the jobs queued after the Hold was made,
// until `release` (or destruction), or until `timeout_s` seconds have passed
// since the stream reached the hold, if given (then `timed_out` is true).
// Synchronising the held stream from the host before releasing it returns
// only at the timeout: a test can find code that waits where it must not,
// instead of hanging.
class Hold {
 public:
  Hold(Stream& stream, std::optional<double> timeout_s);
  ~Hold();
  Hold(const Hold&) = delete;
  Hold& operator=(const Hold&) = delete;
  void release();
  bool timed_out() const;

 private:
  struct Gate {
    mutable std::mutex mutex;
    std::condition_variable opened;
    bool open = false;
    bool timed_out = false;
  };
  std::shared_ptr<Gate> gate_;
};

void check_device(c10::DeviceIndex device);
// The device index an argument means: -1 is the current device.
c10::DeviceIndex resolve(c10::DeviceIndex device);

Stream& stream_of(const c10::Stream& stream);
Stream& stream_of(c10::DeviceIndex device, c10::StreamId id);
Stream& default_stream(c10::DeviceIndex device);
// Round robin over the pool of `high_priority` streams of `device`.
Stream& pool_stream(c10::DeviceIndex device, bool high_priority);
Stream& new_stream(c10::DeviceIndex device);
// The calling thread's current stream on `device` (-1: the current device).
Stream& current_stream(c10::DeviceIndex device = -1);
// Makes `stream` current on its device for the calling thread; returns the old one.
c10::Stream exchange_stream(const c10::Stream& stream);

c10::DeviceIndex current_device();
void set_device(c10::DeviceIndex device);

// Blocks until every stream of `device` has run all the jobs queued so far.
void synchronize_device(c10::DeviceIndex device);
// Blocks until `stream` has run all the jobs queued so far.
void synchronize_stream(Stream& stream);

// Note [Asynchronous errors]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// A job that throws (an out-of-range index in a kernel, say) cannot raise on
// the host thread that queued it: that thread has moved on. As on CUDA, the
// error is kept and raised by the next synchronisation with the device (a
// stream, event or device synchronise, a blocking copy, `.item()`). Unlike on
// CUDA the device stays usable: the error is raised once, then cleared.
void report_async_error(c10::DeviceIndex device, const std::string& message);
void raise_async_error(c10::DeviceIndex device);

} // namespace simdev
