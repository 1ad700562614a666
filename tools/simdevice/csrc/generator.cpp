#include "generator.h"

#include "stream.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/TensorBase.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstring>
#include <mutex>

namespace simdev {

namespace {

// SplitMix64's finaliser: nearby (seed, offset) pairs give unrelated seeds.
uint64_t mix(uint64_t value) {
  value += 0x9e3779b97f4a7c15ULL;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ULL;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebULL;
  return value ^ (value >> 31);
}

} // namespace

Generator::Generator(c10::DeviceIndex device)
    : c10::GeneratorImpl(
          c10::Device(c10::DeviceType::PrivateUse1, device),
          c10::DispatchKeySet(c10::DispatchKey::PrivateUse1)),
      seed_(c10::default_rng_seed_val) {}

void Generator::set_current_seed(uint64_t seed) {
  seed_ = seed;
  offset_ = 0;
}

void Generator::set_offset(uint64_t offset) {
  offset_ = offset;
}

uint64_t Generator::get_offset() const {
  return offset_;
}

uint64_t Generator::current_seed() const {
  return seed_;
}

uint64_t Generator::seed() {
  const uint64_t random = c10::detail::getNonDeterministicRandom();
  set_current_seed(random);
  return random;
}

void Generator::set_state(const c10::TensorImpl& state) {
  TORCH_CHECK(
      state.device().is_cpu() && state.dtype() == caffe2::TypeMeta::Make<uint8_t>() &&
          state.numel() == kStateBytes && state.is_contiguous(),
      "simdev: RNG state must be a contiguous CPU uint8 tensor of ",
      kStateBytes,
      " bytes (from get_rng_state), got ",
      state.numel(),
      " elements of ",
      state.dtype().name());
  const auto* bytes = static_cast<const char*>(state.data());
  std::memcpy(&seed_, bytes, sizeof(seed_));
  std::memcpy(&offset_, bytes + sizeof(seed_), sizeof(offset_));
}

c10::intrusive_ptr<c10::TensorImpl> Generator::get_state() const {
  at::TensorBase state = at::detail::empty_cpu({kStateBytes}, at::kByte);
  auto* bytes = static_cast<char*>(state.mutable_data_ptr());
  std::memcpy(bytes, &seed_, sizeof(seed_));
  std::memcpy(bytes + sizeof(seed_), &offset_, sizeof(offset_));
  return state.getIntrusivePtr();
}

uint64_t Generator::next_kernel_seed() {
  const uint64_t kernel_seed = mix(seed_ ^ mix(offset_));
  offset_ += 1;
  return kernel_seed;
}

Generator* Generator::clone_impl() const {
  auto* copy = new Generator(device().index());
  copy->seed_ = seed_;
  copy->offset_ = offset_;
  return copy;
}

const at::Generator& default_generator(c10::DeviceIndex device) {
  static const auto* generators = [] {
    auto* made = new std::array<at::Generator, kDeviceCount>();
    for (c10::DeviceIndex i = 0; i < kDeviceCount; ++i) {
      (*made)[i] = at::make_generator<Generator>(i);
    }
    return made;
  }();
  device = resolve(device);
  check_device(device);
  return (*generators)[device];
}

at::Generator new_generator(c10::DeviceIndex device) {
  device = resolve(device);
  check_device(device);
  return at::make_generator<Generator>(device);
}

at::Generator kernel_generator(
    const std::optional<at::Generator>& generator,
    c10::DeviceIndex device) {
  at::Generator source = default_generator(device);
  if (generator.has_value() && generator->defined()) {
    TORCH_CHECK(
        generator->device().is_privateuseone(),
        "simdev: a kernel on simdev:",
        static_cast<int>(device),
        " was given a generator for ",
        generator->device(),
        "; use torch.Generator(device='simdev')");
    source = *generator;
  }
  uint64_t kernel_seed = 0;
  {
    std::lock_guard<std::mutex> lock(source.mutex());
    kernel_seed = at::check_generator<Generator>(source)->next_kernel_seed();
  }
  return at::make_generator<at::CPUGeneratorImpl>(kernel_seed);
}

} // namespace simdev
