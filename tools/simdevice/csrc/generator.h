#pragma once

#include <ATen/core/Generator.h>
#include <c10/core/GeneratorImpl.h>

#include <cstdint>
#include <optional>

namespace simdev {

// Note [Philox-style RNG]
// ~~~~~~~~~~~~~~~~~~~~~~~
// Like CUDA's Philox generator, a simdev generator is a (seed, offset) pair
// advanced on the host when a random kernel is queued, not when it runs. The
// kernel job gets a CPU generator seeded from the pair it was given, so the
// host-side state (get_rng_state / set_rng_state, what checkpointing saves and
// restores) always describes the work queued so far, and replaying from a
// saved state draws the same numbers however the streams are scheduled.
class Generator final : public c10::GeneratorImpl {
 public:
  // The state as bytes: seed then offset, 8 bytes each (CUDA's layout).
  static constexpr int64_t kStateBytes = 16;

  explicit Generator(c10::DeviceIndex device);

  void set_current_seed(uint64_t seed) override;
  void set_offset(uint64_t offset) override;
  uint64_t get_offset() const override;
  uint64_t current_seed() const override;
  uint64_t seed() override;
  void set_state(const c10::TensorImpl& state) override;
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override;
  static c10::DeviceType device_type() {
    return c10::DeviceType::PrivateUse1;
  }

  // Hands out one kernel's worth of randomness; call with `mutex_` held.
  uint64_t next_kernel_seed();

 private:
  Generator* clone_impl() const override;

  uint64_t seed_;
  uint64_t offset_ = 0;
};

const at::Generator& default_generator(c10::DeviceIndex device);
at::Generator new_generator(c10::DeviceIndex device);

// A CPU generator for one random kernel queued on `device`: drawn from
// `generator` if it is a simdev generator, else from the device's default.
at::Generator kernel_generator(
    const std::optional<at::Generator>& generator,
    c10::DeviceIndex device);

} // namespace simdev
