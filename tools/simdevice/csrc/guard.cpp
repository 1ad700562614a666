// The device guard implementation: what torch's device-generic code (c10::Event,
// StreamGuard, VirtualGuardImpl, the autograd engine) calls for PrivateUse1.

#include "device_allocator.h"
#include "stream.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <chrono>

namespace simdev {

// Note [Event versions]
// ~~~~~~~~~~~~~~~~~~~~~
// An event can be recorded again while streams still wait on an earlier
// record, so each record makes a new Recording and the event points at the
// latest. `block` captures the recording that is current when it is called
// (cudaStreamWaitEvent semantics): a later record does not move the wait.
// Wait jobs hold their recording, so destroying the event does not cancel
// them. An event that was never recorded is complete.

namespace {

struct Event {
  c10::EventFlag flag;
  std::shared_ptr<Recording> last;
};

Event* as_event(void* event) {
  return static_cast<Event*>(event);
}

c10::Device simdev_device(c10::DeviceIndex index) {
  return c10::Device(c10::DeviceType::PrivateUse1, index);
}

struct GuardImpl final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override {
    return c10::DeviceType::PrivateUse1;
  }

  c10::Device exchangeDevice(c10::Device device) const override {
    const c10::Device previous = getDevice();
    setDevice(device);
    return previous;
  }

  c10::Device getDevice() const override {
    return simdev_device(current_device());
  }

  void setDevice(c10::Device device) const override {
    TORCH_CHECK(device.is_privateuseone(), "simdev: expected a simdev device, got ", device);
    if (device.has_index()) {
      set_device(device.index());
    }
  }

  void uncheckedSetDevice(c10::Device device) const noexcept override {
    if (device.has_index() && device.index() >= 0 && device.index() < kDeviceCount) {
      set_device(device.index());
    }
  }

  c10::Stream getStream(c10::Device device) const override {
    return current_stream(device.index()).handle();
  }

  c10::Stream getDefaultStream(c10::Device device) const override {
    return default_stream(device.index()).handle();
  }

  c10::Stream getStreamFromGlobalPool(c10::Device device, bool high_priority)
      const override {
    return pool_stream(device.index(), high_priority).handle();
  }

  c10::Stream getNewStream(c10::Device device, int /*priority*/) const override {
    return new_stream(device.index()).handle();
  }

  c10::Stream exchangeStream(c10::Stream stream) const override {
    return exchange_stream(stream);
  }

  c10::DeviceIndex deviceCount() const noexcept override {
    return kDeviceCount;
  }

  bool queryStream(const c10::Stream& stream) const override {
    Stream& target = stream_of(stream);
    return target.reached(target.last_enqueued());
  }

  void synchronizeStream(const c10::Stream& stream) const override {
    synchronize_stream(stream_of(stream));
  }

  void synchronizeDevice(c10::DeviceIndex device) const override {
    synchronize_device(device);
  }

  void record(
      void** event,
      const c10::Stream& stream,
      const c10::DeviceIndex device_index,
      const c10::EventFlag flag) const override {
    TORCH_CHECK(
        device_index == -1 || device_index == stream.device_index(),
        "simdev: event device index ",
        static_cast<int>(device_index),
        " does not match the recording stream's device ",
        stream.device());
    if (*event == nullptr) {
      *event = new Event{flag, nullptr};
    }
    as_event(*event)->last = simdev::record(stream_of(stream));
  }

  void block(void* event, const c10::Stream& stream) const override {
    if (event == nullptr || !as_event(event)->last) {
      return;
    }
    simdev::block(stream_of(stream), as_event(event)->last);
  }

  bool queryEvent(void* event) const override {
    if (event == nullptr || !as_event(event)->last) {
      return true;
    }
    const auto& recording = as_event(event)->last;
    return recording->stream->reached(recording->seq);
  }

  void synchronizeEvent(void* event) const override {
    if (event == nullptr || !as_event(event)->last) {
      return;
    }
    const auto& recording = as_event(event)->last;
    recording->stream->wait(recording->seq);
    raise_async_error(recording->stream->device_index());
  }

  double elapsedTime(void* start, void* end, const c10::DeviceIndex /*device*/)
      const override {
    TORCH_CHECK(
        start != nullptr && end != nullptr && as_event(start)->last &&
            as_event(end)->last,
        "simdev: both events must be recorded before calculating elapsed time.");
    TORCH_CHECK(
        as_event(start)->flag == c10::EventFlag::BACKEND_DEFAULT &&
            as_event(end)->flag == c10::EventFlag::BACKEND_DEFAULT,
        "simdev: both events must be created with argument 'enable_timing=True'.");
    TORCH_CHECK(
        queryEvent(start) && queryEvent(end),
        "simdev: both events must be completed before calculating elapsed time.");
    return std::chrono::duration<double, std::milli>(
               as_event(end)->last->time - as_event(start)->last->time)
        .count();
  }

  void destroyEvent(void* event, const c10::DeviceIndex /*device*/)
      const noexcept override {
    delete as_event(event);
  }

  void recordDataPtrOnStream(const c10::DataPtr& data, const c10::Stream& stream)
      const override {
    device_allocator().recordStream(data, stream);
  }
};

} // namespace

C10_REGISTER_GUARD_IMPL(PrivateUse1, GuardImpl);

} // namespace simdev
