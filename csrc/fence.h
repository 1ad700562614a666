#pragma once

#include <c10/core/Event.h>
#include <c10/core/Stream.h>

#include <chrono>
#include <memory>

namespace gcoffload {

// A point in one device stream's work queue that later work can wait for.
//
// On a device with streams (CUDA, XPU, ...) it wraps a c10::Event. On the CPU,
// where every copy is synchronous, a fence is complete the moment it exists, so
// the same code path runs on both without `if (cpu)` branches at each use.
// Copies share the underlying event: a fence is a value, cheap to pass around.
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

  // True once all work queued before the fence has finished.
  bool done() const {
    return !event_ || event_->query();
  }

  // Makes `stream` wait (on the device, not the host) for the fence.
  void block(const c10::Stream& stream) const {
    if (event_) {
      event_->block(stream);
    }
  }

  // Blocks the calling host thread until the fence is done.
  void synchronize() const {
    if (event_) {
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
  std::shared_ptr<c10::Event> event_;
  std::chrono::steady_clock::time_point wall_clock_{};
};

} // namespace gcoffload
