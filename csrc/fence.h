#pragma once

#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace gcoffload {

// A point in one device stream's work queue that later work can wait for.
//
// On a device with streams (CUDA, XPU, ...) it wraps a c10::Event. On the CPU,
// where every copy is synchronous, a fence is complete the moment it exists, so
// the same code path runs on both without `if (cpu)` branches at each use.
// A third kind is completed by a host thread (`host_signal`): the copy behind it
// ran on that thread with blocking copies, so once it is signalled the device
// holds nothing more to wait for (Note [Pageable copies off the compute
// thread]); a fourth (`all`) joins others. Copies share the underlying
// state: a fence is a value, cheap to pass around.
class Fence {
 public:
  // A fence that is already complete.
  Fence() = default;

  // Marks the current end of `stream`'s queue. `timing` makes the event usable
  // with `elapsed_ms`, which costs a little more on CUDA, so only traces ask.
  static Fence record(const c10::Stream& stream, bool timing = false) {
    Fence fence;
    if (stream.device_type() == c10::DeviceType::CPU) {
      fence.wall_clock_ = std::chrono::steady_clock::now();
      return fence;
    }
    fence.event_ = std::make_shared<c10::Event>(
        stream.device_type(),
        timing ? c10::EventFlag::BACKEND_DEFAULT
               : c10::EventFlag::PYTORCH_DEFAULT);
    fence.event_->record(stream);
    return fence;
  }

  // A fence that completes when `signal` is called on it (or a copy of it).
  static Fence host_signal() {
    Fence fence;
    fence.host_ = std::make_shared<HostSignal>();
    return fence;
  }

  // A fence done once every one of `fences` is.
  static Fence all(std::vector<Fence> fences) {
    Fence fence;
    fence.all_ = std::make_shared<const std::vector<Fence>>(std::move(fences));
    return fence;
  }

  // Completes a `host_signal` fence; `error` (if not empty) is raised by
  // every later wait on it.
  void signal(std::string error = {}) const {
    TORCH_INTERNAL_ASSERT(host_, "signal() on a fence that is not a host_signal()");
    {
      std::lock_guard<std::mutex> lock(host_->mutex);
      host_->done = true;
      host_->error = std::move(error);
    }
    host_->signalled.notify_all();
  }

  bool is_host_signal() const {
    return host_ != nullptr;
  }

  // True once all work queued before the fence has finished.
  bool done() const {
    if (all_) {
      return std::all_of(all_->begin(), all_->end(), [](const Fence& fence) {
        return fence.done();
      });
    }
    if (host_) {
      std::lock_guard<std::mutex> lock(host_->mutex);
      return host_->done;
    }
    return !event_ || event_->query();
  }

  // Makes `stream` wait (on the device, not the host) for the fence. A
  // `host_signal` fence has nothing on the device to wait for: the calling
  // thread waits until it is signalled.
  void block(const c10::Stream& stream) const {
    if (all_) {
      for (const Fence& fence : *all_) {
        fence.block(stream);
      }
    } else if (host_) {
      wait_on_host();
    } else if (event_) {
      event_->block(stream);
    }
  }

  // Blocks the calling host thread until the fence is done.
  void synchronize() const {
    if (all_) {
      for (const Fence& fence : *all_) {
        fence.synchronize();
      }
    } else if (host_) {
      wait_on_host();
    } else if (event_) {
      event_->synchronize();
    }
  }

  // Milliseconds from `start` to this fence. Both must come from
  // `record(..., timing=true)` on the same kind of device and be done.
  double elapsed_ms(const Fence& start) const {
    if (event_ && start.event_) {
      return start.event_->elapsedTime(*event_);
    }
    return std::chrono::duration<double, std::milli>(
               wall_clock_ - start.wall_clock_)
        .count();
  }

 private:
  struct HostSignal {
    std::mutex mutex;
    std::condition_variable signalled;
    bool done = false;
    std::string error;
  };

  void wait_on_host() const {
    std::unique_lock<std::mutex> lock(host_->mutex);
    host_->signalled.wait(lock, [this] { return host_->done; });
    TORCH_CHECK(host_->error.empty(), host_->error);
  }

  std::shared_ptr<c10::Event> event_;
  std::shared_ptr<HostSignal> host_;
  std::shared_ptr<const std::vector<Fence>> all_;
  std::chrono::steady_clock::time_point wall_clock_{};
};

} // namespace gcoffload
