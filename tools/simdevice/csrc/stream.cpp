#include "stream.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace simdev {

// Note [Stream ids]
// ~~~~~~~~~~~~~~~~~
// A c10::Stream is a (device, id) pair, so the id alone must find the stream:
// 0 is the default stream, 1..kPoolSize the low-priority pool, the next
// kPoolSize ids the high-priority pool, and ids after that are streams made by
// getNewStream, in order of creation.

namespace {

constexpr c10::StreamId kFirstHighPriority = 1 + kPoolSize;
constexpr c10::StreamId kFirstNew = 1 + 2 * kPoolSize;

class Device {
 public:
  explicit Device(c10::DeviceIndex index) : index_(index) {
    for (c10::StreamId id = 0; id < kFirstNew; ++id) {
      streams_.push_back(new Stream(index, id));
    }
  }

  Stream& get(c10::StreamId id) {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(
        id >= 0 && static_cast<size_t>(id) < streams_.size(),
        "simdev: no stream with id ",
        id,
        " on simdev:",
        static_cast<int>(index_));
    return *streams_[id];
  }

  Stream& pool(bool high_priority) {
    auto& counter = high_priority ? next_high_ : next_low_;
    const c10::StreamId first = high_priority ? kFirstHighPriority : 1;
    return get(first + counter.fetch_add(1) % kPoolSize);
  }

  Stream& create() {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto id = static_cast<c10::StreamId>(streams_.size());
    streams_.push_back(new Stream(index_, id));
    return *streams_.back();
  }

  std::vector<Stream*> all() {
    std::lock_guard<std::mutex> lock(mutex_);
    return streams_;
  }

  void report(const std::string& message) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_) {
      error_ = message;
    }
  }

  std::optional<std::string> take_error() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(error_, std::nullopt);
  }

 private:
  const c10::DeviceIndex index_;
  std::mutex mutex_;
  std::vector<Stream*> streams_; // leaked on purpose, see Stream
  std::atomic<uint32_t> next_low_{0};
  std::atomic<uint32_t> next_high_{0};
  std::optional<std::string> error_;
};

Device& device(c10::DeviceIndex index) {
  static const auto devices = [] {
    auto* made = new std::array<Device*, kDeviceCount>();
    for (c10::DeviceIndex i = 0; i < kDeviceCount; ++i) {
      (*made)[i] = new Device(i);
    }
    return made;
  }();
  check_device(index);
  return *(*devices)[index];
}

thread_local c10::DeviceIndex tls_device = 0;
thread_local std::array<c10::StreamId, kDeviceCount> tls_streams{};

} // namespace

Stream::Stream(c10::DeviceIndex device, c10::StreamId id)
    : device_(device), id_(id) {}

c10::Stream Stream::handle() const {
  return c10::Stream(
      c10::Stream::UNSAFE,
      c10::Device(c10::DeviceType::PrivateUse1, device_),
      id_);
}

uint64_t Stream::enqueue(Job job) {
  uint64_t seq = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!started_) {
      std::thread(&Stream::run, this).detach();
      started_ = true;
    }
    queue_.push_back(std::move(job));
    seq = ++enqueued_;
  }
  work_.notify_one();
  return seq;
}

uint64_t Stream::last_enqueued() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return enqueued_;
}

bool Stream::reached(uint64_t seq) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_ >= seq;
}

void Stream::wait(uint64_t seq) const {
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return completed_ >= seq; });
}

void Stream::run() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_.wait(lock, [&] { return !queue_.empty(); });
      job = std::move(queue_.front());
    }
    try {
      job();
    } catch (const c10::Error& error) {
      report_async_error(device_, error.what_without_backtrace());
    } catch (const std::exception& error) {
      report_async_error(device_, error.what());
    }
    job = nullptr; // release what the job captured before it counts as done
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.pop_front();
      completed_ += 1;
    }
    done_.notify_all();
  }
}

std::shared_ptr<Recording> record(Stream& stream) {
  auto recording = std::make_shared<Recording>();
  recording->stream = &stream;
  recording->seq = stream.enqueue([recording] {
    recording->time = std::chrono::steady_clock::now();
  });
  return recording;
}

void block(Stream& stream, const std::shared_ptr<Recording>& recording) {
  if (recording->stream == &stream) {
    return; // stream order already places later work behind the marker
  }
  stream.enqueue([recording] { recording->stream->wait(recording->seq); });
}

Hold::Hold(Stream& stream, std::optional<double> timeout_s)
    : gate_(std::make_shared<Gate>()) {
  stream.enqueue([gate = gate_, timeout_s] {
    std::unique_lock<std::mutex> lock(gate->mutex);
    const auto open = [&] { return gate->open; };
    if (!timeout_s) {
      gate->opened.wait(lock, open);
    } else if (!gate->opened.wait_for(
                   lock, std::chrono::duration<double>(*timeout_s), open)) {
      gate->timed_out = true;
    }
  });
}

bool Hold::timed_out() const {
  std::lock_guard<std::mutex> lock(gate_->mutex);
  return gate_->timed_out;
}

Hold::~Hold() {
  release();
}

void Hold::release() {
  {
    std::lock_guard<std::mutex> lock(gate_->mutex);
    gate_->open = true;
  }
  gate_->opened.notify_all();
}

void check_device(c10::DeviceIndex device) {
  TORCH_CHECK(
      device >= 0 && device < kDeviceCount,
      "simdev: device index must be in [0, ",
      static_cast<int>(kDeviceCount),
      "), got ",
      static_cast<int>(device));
}

c10::DeviceIndex resolve(c10::DeviceIndex device) {
  return device < 0 ? tls_device : device;
}

Stream& stream_of(const c10::Stream& stream) {
  TORCH_CHECK(
      stream.device_type() == c10::DeviceType::PrivateUse1,
      "simdev: expected a simdev stream, got one on ",
      stream.device());
  return device(stream.device_index()).get(stream.id());
}

Stream& stream_of(c10::DeviceIndex index, c10::StreamId id) {
  return device(index).get(id);
}

Stream& default_stream(c10::DeviceIndex index) {
  return device(resolve(index)).get(0);
}

Stream& pool_stream(c10::DeviceIndex index, bool high_priority) {
  return device(resolve(index)).pool(high_priority);
}

Stream& new_stream(c10::DeviceIndex index) {
  return device(resolve(index)).create();
}

Stream& current_stream(c10::DeviceIndex index) {
  index = resolve(index);
  return device(index).get(tls_streams[index]);
}

c10::Stream exchange_stream(const c10::Stream& stream) {
  Stream& next = stream_of(stream);
  const c10::DeviceIndex index = next.device_index();
  const c10::Stream previous = device(index).get(tls_streams[index]).handle();
  tls_streams[index] = next.id();
  return previous;
}

c10::DeviceIndex current_device() {
  return tls_device;
}

void set_device(c10::DeviceIndex index) {
  check_device(index);
  tls_device = index;
}

void synchronize_stream(Stream& stream) {
  stream.wait(stream.last_enqueued());
  raise_async_error(stream.device_index());
}

void synchronize_device(c10::DeviceIndex index) {
  index = resolve(index);
  for (Stream* stream : device(index).all()) {
    stream->wait(stream->last_enqueued());
  }
  raise_async_error(index);
}

void report_async_error(c10::DeviceIndex index, const std::string& message) {
  device(index).report(message);
}

void raise_async_error(c10::DeviceIndex index) {
  if (auto error = device(index).take_error()) {
    TORCH_CHECK(
        false,
        "simdev: a job queued earlier on simdev:",
        static_cast<int>(index),
        " failed (errors of queued work surface at the next synchronisation, "
        "as on CUDA): ",
        *error);
  }
}

} // namespace simdev
