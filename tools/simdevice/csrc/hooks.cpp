// The PrivateUse1 hooks: how torch finds simdev's device count, current
// device, generators and pinned memory (`pin_memory=True`, `is_pinned`).

#include "device_allocator.h"
#include "generator.h"
#include "host_allocator.h"
#include "stream.h"

#include <ATen/detail/PrivateUse1HooksInterface.h>

namespace simdev {

namespace {

struct Hooks final : public at::PrivateUse1HooksInterface {
  bool isBuilt() const override {
    return true;
  }

  bool isAvailable() const override {
    return true;
  }

  bool hasPrimaryContext(c10::DeviceIndex /*device*/) const override {
    return true;
  }

  c10::DeviceIndex deviceCount() const override {
    return kDeviceCount;
  }

  void setCurrentDevice(c10::DeviceIndex device) const override {
    set_device(device);
  }

  c10::DeviceIndex getCurrentDevice() const override {
    return current_device();
  }

  c10::DeviceIndex exchangeDevice(c10::DeviceIndex device) const override {
    const c10::DeviceIndex previous = current_device();
    set_device(device);
    return previous;
  }

  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex device) const override {
    return exchangeDevice(device);
  }

  bool isPinnedPtr(const void* data) const override {
    return host_allocator().is_pinned(data);
  }

  at::Allocator* getPinnedMemoryAllocator() const override {
    return &host_allocator();
  }

  const at::Generator& getDefaultGenerator(c10::DeviceIndex device) const override {
    return default_generator(device);
  }

  at::Generator getNewGenerator(c10::DeviceIndex device) const override {
    return new_generator(device);
  }

  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t nbytes)
      const override {
    resize_storage(storage, nbytes);
  }
};

struct Registration {
  Registration() {
    at::RegisterPrivateUse1HooksInterface(new Hooks());
  }
} registration;

} // namespace

} // namespace simdev
